"""A served image's embeddings against the F32 reference, with INT8's own bounds.

    accuracy.py embed PORT MODEL OUT [--every N]
        POSTs the reference sentences (server/tests/fixtures/sentences.json; every Nth with
        --every, for a server under emulation) to http://127.0.0.1:PORT/embed, checks each
        embedding against its F32 reference row (ONNX Runtime on all-MiniLM-L6-v2,
        models/reference/make_fixtures.py) and writes them to OUT.
    accuracy.py agree A B BOUND
        Cosine between the embeddings two images gave for the same sentences.

INT8's promise against F32 is mean cosine >= 0.998 and min >= 0.99 (server/tests/embeddings.rs
holds every kernel path to it): that is what each image must meet. Two images on different
ISAs are each that close to F32, not bit-identical to each other: their f32 parts (attention,
LayerNorm sums) round differently, so a requantized activation can land on the next int8 level.
"""

import json
import math
import struct
import sys
import urllib.request
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "server/tests/fixtures"
REFERENCE_MODEL = "all-MiniLM-L6-v2"
MEAN_BOUND, MIN_BOUND = 0.998, 0.99
BATCH = 32  # the server's default max_client_batch_size


def cosine(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def reference():
    header = json.loads((FIXTURES / "minilm_embeddings.json").read_text())
    sentences = json.loads((FIXTURES / "sentences.json").read_text())
    dim = header["dim"]
    data = (FIXTURES / "minilm_embeddings.f32").read_bytes()
    rows = [list(struct.unpack_from(f"<{dim}f", data, 4 * dim * i)) for i in range(len(sentences))]
    return sentences, rows


def post_embed(port, inputs):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/embed",
        # The reference truncated its longest sentences at the model's 256 tokens.
        data=json.dumps({"inputs": inputs, "truncate": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.load(answer)


def embed(port, model, out, every=1):
    if model != REFERENCE_MODEL:
        sys.exit(f"no F32 reference fixture for {model}: server/tests/fixtures has {REFERENCE_MODEL}'s")
    sentences, rows = reference()
    picked = list(range(0, len(sentences), every))
    got = []
    for start in range(0, len(picked), BATCH):
        got += post_embed(port, [sentences[i] for i in picked[start : start + BATCH]])
    assert len(got) == len(picked), f"{len(got)} embeddings for {len(picked)} inputs"
    cosines = [cosine(e, rows[i]) for e, i in zip(got, picked)]
    mean = sum(cosines) / len(cosines)
    worst = min(range(len(cosines)), key=cosines.__getitem__)
    print(
        f"    vs the F32 reference over {len(picked)} sentences: mean cosine {mean:.6f}, "
        f"min {cosines[worst]:.6f} ({sentences[picked[worst]]!r})"
    )
    assert mean >= MEAN_BOUND and cosines[worst] >= MIN_BOUND, (
        f"INT8 promises mean >= {MEAN_BOUND} and min >= {MIN_BOUND} against F32; "
        f"got {mean:.6f} / {cosines[worst]:.6f}"
    )
    Path(out).write_text(json.dumps({"indices": picked, "embeddings": got}))


def agree(a, b, bound):
    a, b = (json.loads(Path(p).read_text()) for p in (a, b))
    by_index = dict(zip(a["indices"], a["embeddings"]))
    cosines = [cosine(by_index[i], e) for i, e in zip(b["indices"], b["embeddings"]) if i in by_index]
    assert cosines, "the two images embedded no sentence in common"
    print(f"    cosine between the two images over {len(cosines)} sentences: min {min(cosines):.7f}")
    assert min(cosines) >= bound, f"min cosine {min(cosines)} < {bound}"


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "embed":
        every = int(args[4]) if args[3:4] == ["--every"] else 1
        embed(int(args[0]), args[1], args[2], every)
    elif command == "agree":
        agree(args[0], args[1], float(args[2]))
    else:
        sys.exit(__doc__)
