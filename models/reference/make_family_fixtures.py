#!/usr/bin/env python3
"""Reference outputs of the MPNet, XLM-RoBERTa and ModernBERT families for the Rust model tests,
from the reference implementation itself: transformers and sentence-transformers on torch, FP32,
CPU, eager attention, eval mode, one input at a time (no padding).

Checkpoints: the tiny ones that models/make_family_checkpoints writes (numpy-built; each is loaded
with from_pretrained(output_loading_info=True) and this script fails on any missing, unexpected or
mismatched tensor, which proves their layout is exactly the one transformers expects) and the real
all-mpnet-base-v2 (models/fetch all-mpnet-base-v2).

Writes server/tests/fixtures/families/:
  <name>.json + <name>.f32        embedders: one little-endian f32 row per sentence of
                                  server/tests/fixtures/sentences.json: the checkpoint's
                                  tokenizer.json ids (tokenizers, as the server tokenizes,
                                  truncated at sentence_bert_config.json's max_seq_length) through
                                  transformers' AutoModel, last_hidden_state mean-pooled over the
                                  input's tokens (L2-normalized where modules.json has Normalize);
                                  each row is checked to equal SentenceTransformer(<dir>).encode
                                  within 1e-5 wherever sentence-transformers' own tokenizer gives
                                  the same ids (transformers 5 rebuilds the XLM-RoBERTa tokenizer
                                  from its vocabulary and drops a trailing lone '▁' that
                                  tokenizer.json keeps, on 2 of the 129 sentences)
  <name>.multilingual.json + .f32 the same for server/tests/fixtures/multilingual_sentences.json
                                  (tiny-xlm-roberta only)
  <name>.rerank.json              rerankers: the logit of each (query, passage) pair of
                                  server/tests/fixtures/rerank_pairs.json, tokenized as a pair by
                                  the checkpoint's tokenizer.json (input_ids and attention_mask
                                  only: neither family has token types)
Every embedding header has the same fields (models/reference/make_family_fixtures.py EMBED_FIELDS):
source, checkpoint, checkpoint_sha256, architecture, model_type, pooling, normalized, max_tokens,
inputs, data, count, dim, token_counts. A rerank file has source, checkpoint, checkpoint_sha256,
architecture, model_type, pooling, max_tokens, inputs, count, token_counts, logits (the last two
grouped like rerank_pairs.json: one list per query, one entry per passage).

Setup and run (repository root; torch's PyPI wheel with its CUDA libraries is about 5.8 GB
installed and took about 3.5 minutes here; CPU is enough):
  tests/python-env && models/fetch && models/fetch all-mpnet-base-v2
  .venv/bin/python models/make_family_checkpoints
  python3 -m venv .venv-reference
  .venv-reference/bin/pip install torch==2.15.0 transformers==5.23.0 \\
      sentence-transformers==6.2.0 numpy==2.4.6 safetensors==0.8.0
  .venv-reference/bin/python models/reference/make_family_fixtures.py [name ...]
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "models" / "cache"
FIXTURES = ROOT / "server" / "tests" / "fixtures"
OUT = FIXTURES / "families"

# name, task, pooling (the embedder's or the classifier's), inputs
CHECKPOINTS = [
    ("tiny-xlm-roberta", "embed", "mean", ["sentences.json", "multilingual_sentences.json"]),
    ("tiny-xlm-roberta-reranker", "rerank", "cls", ["rerank_pairs.json"]),
    ("tiny-modernbert", "embed", "mean", ["sentences.json"]),
    ("tiny-modernbert-reranker", "rerank", "cls", ["rerank_pairs.json"]),
    ("tiny-modernbert-reranker-mean", "rerank", "mean", ["rerank_pairs.json"]),
    ("all-mpnet-base-v2", "embed", "mean", ["sentences.json"]),
]
EMBED_FIELDS = ["source", "checkpoint", "checkpoint_sha256", "architecture", "model_type",
                "pooling", "normalized", "max_tokens", "inputs", "data", "count", "dim",
                "token_counts"]
RERANK_MAX_TOKENS = 512
# Agreement demanded between SentenceTransformer and the plain transformers computation.
CROSS_CHECK = 1e-5

SOURCE = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}; FP32 CPU, eager attention")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(directory, cls):
    """from_pretrained that fails unless the checkpoint's tensors are exactly the model's."""
    model, info = cls.from_pretrained(directory, output_loading_info=True, dtype=torch.float32,
                                      attn_implementation="eager")
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise SystemExit(f"{directory}: checkpoint does not match {type(model).__name__}: {info}")
    model.eval()
    return model


def forward(model, ids):
    ids = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))


def tokenizer(directory, max_tokens):
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()  # all-MiniLM-L6-v2's tokenizer.json pads to 128
    if max_tokens:
        tok.enable_truncation(max_tokens)
    else:
        tok.no_truncation()
    return tok


def cosine_spread(rows):
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = cos[~np.eye(len(rows), dtype=bool)]
    return f"pairwise cosine min {off.min():.3f} median {np.median(off):.3f} max {off.max():.3f}"


def embed(name, pooling, inputs_file, directory, config):
    sentences = json.loads((FIXTURES / inputs_file).read_text())
    st = SentenceTransformer(str(directory), device="cpu")
    st.eval()
    max_tokens = st.max_seq_length
    normalized = any(type(m).__name__ == "Normalize" for m in st)
    tok = tokenizer(directory, max_tokens)
    model = load(directory, AutoModel)
    rows, counts, differs = [], [], []
    for n, text in enumerate(sentences):
        # The fixture: the checkpoint's tokenizer.json (as the server tokenizes), transformers'
        # last_hidden_state, mean-pooled over the input's tokens (and L2-normalized where the
        # checkpoint's modules.json has a Normalize module).
        ids = tok.encode(text).ids
        hidden = forward(model, ids).last_hidden_state[0].numpy()
        row = hidden.mean(axis=0)
        if normalized:
            row = row / np.linalg.norm(row)
        # Checked against sentence-transformers itself wherever its tokenizer gives the same
        # ids (transformers 5 builds some tokenizers from the vocabulary and its own pipeline,
        # not from tokenizer.json's normalizer and pre-tokenizer).
        if st.preprocess([text])["input_ids"][0].tolist() == ids:
            theirs = st.encode([text], batch_size=1, convert_to_numpy=True)[0]
            if np.abs(theirs - row).max() > CROSS_CHECK:
                raise SystemExit(f"{name}: SentenceTransformer and transformers differ on "
                                 f"{text!r}: {np.abs(theirs - row).max()}")
        else:
            differs.append(n)
        rows.append(row)
        counts.append(len(ids))
    if len(differs) > len(sentences) // 10:
        raise SystemExit(f"{name}: sentence-transformers tokenizes {len(differs)} inputs differently")
    rows = np.stack(rows).astype("<f4")
    stem = name if inputs_file == "sentences.json" else f"{name}.{inputs_file.split('_')[0]}"
    (OUT / f"{stem}.f32").write_bytes(rows.tobytes())
    header = {
        "source": f"{SOURCE}; tokenizer.json ids, last_hidden_state mean-pooled"
                  f"{' and L2-normalized' if normalized else ''}, equal to "
                  f"SentenceTransformer(<dir>).encode within {CROSS_CHECK} on the "
                  f"{len(sentences) - len(differs)} inputs its tokenizer gives the same ids",
        "checkpoint": name,
        "checkpoint_sha256": sha256(directory / "model.safetensors"),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "pooling": pooling,
        "normalized": normalized,
        "max_tokens": max_tokens,
        "inputs": inputs_file,
        "data": f"{stem}.f32",
        "count": len(sentences),
        "dim": rows.shape[1],
        "token_counts": counts,
    }
    assert list(header) == EMBED_FIELDS
    write_json(OUT / f"{stem}.json", header)
    long = sum(c > 32 for c in counts)
    print(f"{stem}: {len(rows)} x {rows.shape[1]}, tokens {min(counts)}..{max(counts)} "
          f"({long} over 32, {sum(c == max_tokens for c in counts)} truncated), {cosine_spread(rows)}; "
          f"sentence-transformers tokenizes differently: {[sentences[n] for n in differs]}")
    return counts


def rerank(name, pooling, inputs_file, directory, config):
    if getattr(config, "classifier_pooling", "cls") != pooling:
        raise SystemExit(f"{name}: classifier_pooling is {config.classifier_pooling}, expected {pooling}")
    model = load(directory, AutoModelForSequenceClassification)
    tok = tokenizer(directory, None)
    groups = json.loads((FIXTURES / inputs_file).read_text())
    logits, counts = [], []
    for group in groups:
        scores, lengths = [], []
        for passage in group["passages"]:
            ids = tok.encode(group["query"], passage).ids
            if len(ids) > RERANK_MAX_TOKENS:
                raise SystemExit(f"{name}: a pair of {len(ids)} tokens")
            out = forward(model, ids).logits[0]
            assert out.shape == (1,)
            scores.append(float(out[0]))
            lengths.append(len(ids))
        logits.append(scores)
        counts.append(lengths)
    out = {
        "source": f"{SOURCE}; {type(model).__name__}(input_ids, attention_mask).logits",
        "checkpoint": name,
        "checkpoint_sha256": sha256(directory / "model.safetensors"),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "pooling": pooling,
        "max_tokens": RERANK_MAX_TOKENS,
        "inputs": inputs_file,
        "count": sum(map(len, logits)),
        "token_counts": counts,
        "logits": logits,
    }
    write_json(OUT / f"{name}.rerank.json", out)
    flat = np.array([x for g in logits for x in g])
    spread = np.mean([np.std(g) for g in logits])
    print(f"{name}.rerank: {len(flat)} logits {flat.min():.3f}..{flat.max():.3f}, "
          f"mean std within a query {spread:.3f}")


def write_json(path, obj):
    """One field a line, and one line per query for the grouped lists: readable, small diffs."""
    fields = []
    for key, value in obj.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            text = "[\n  " + ",\n  ".join(json.dumps(v) for v in value) + "\n ]"
        else:
            text = json.dumps(value, ensure_ascii=False)
        fields.append(f" {json.dumps(key)}: {text}")
    path.write_text("{\n" + ",\n".join(fields) + "\n}\n")


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    wanted = set(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    for name, task, pooling, inputs in CHECKPOINTS:
        if wanted and name not in wanted:
            continue
        directory = CACHE / name
        if not (directory / "model.safetensors").exists():
            raise SystemExit(f"{directory} is missing: run models/make_family_checkpoints "
                             f"(tiny-*) or models/fetch {name}")
        config = AutoConfig.from_pretrained(directory)
        for inputs_file in inputs:
            (embed if task == "embed" else rerank)(name, pooling, inputs_file, directory, config)


if __name__ == "__main__":
    main()
