"""Shared by the client tests: the real `qmodel-server` binary, serving an artifact quantized
from a real checkpoint into a temporary directory, with an API key and the gRPC port on.

Needs `target/release/qmodel-server` (cargo build --release -p qmodel-server, or set
QMODEL_SERVER) and the checkpoints under models/cache (models/fetch, models/make_reranker).
Anything missing is a failure, never a skip.
"""

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("QMODEL_SERVER", ROOT / "target/release/qmodel-server"))
CACHE = ROOT / "models/cache"
API_KEY = "python-client-key"


@contextlib.contextmanager
def served(checkpoint_name, precision="int8", **env):
    """Quantizes models/cache/<checkpoint_name> and serves it; yields (http base, gRPC target)."""
    checkpoint = CACHE / checkpoint_name
    assert BINARY.exists(), f"{BINARY} is missing: run `cargo build --release -p qmodel-server`"
    assert (checkpoint / "model.safetensors").exists(), (
        f"{checkpoint} is missing: run models/fetch and models/make_reranker"
    )
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        subprocess.run(
            [BINARY, "quantize", "--from", checkpoint, "--out", artifact, "--precision", precision,
             "--model-id", checkpoint_name],
            check=True,
            capture_output=True,
        )
        env = dict(os.environ, MODEL_DIR=str(artifact), HOST="127.0.0.1", PORT="0", GRPC_PORT="0",
                   API_KEY=API_KEY, RUST_LOG="info", JSON_OUTPUT="false", **env)
        proc = subprocess.Popen([BINARY, "serve"], env=env, stdout=subprocess.PIPE, text=True)
        try:
            base = grpc_target = None
            for line in proc.stdout:
                if "listening addr=" in line:
                    base = "http://" + line.split("listening addr=")[1].strip()
                if "grpc_addr=" in line:
                    grpc_target = line.split("grpc_addr=")[1].split()[0].strip()
                if base and grpc_target:
                    break
            assert base and grpc_target, "the server exited before listening"
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            deadline = time.time() + 30
            while True:
                try:
                    if urllib.request.urlopen(base + "/ready").status == 200:
                        break
                except OSError:
                    pass
                assert time.time() < deadline, "not ready after 30 s"
                time.sleep(0.05)
            yield base, grpc_target
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0


def post(base, path, body):
    """A JSON POST with the API key, answered as JSON (any status)."""
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{path}: {e.code} {e.read().decode()}") from e


def embed(base, texts, **fields):
    """The TEI /embed vectors of `texts`: what every other shape is compared with."""
    return np.array(post(base, "/embed", {"inputs": texts, **fields}), dtype=np.float32)


def rerank(base, query, texts):
    """TEI /rerank: [(index, score)], best first."""
    return [(r["index"], r["score"]) for r in post(base, "/rerank", {"query": query, "texts": texts})]


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="session")
def embedder():
    with served("all-MiniLM-L6-v2") as addresses:
        yield addresses


@pytest.fixture(scope="session")
def reranker():
    with served("minilm-reranker-test") as addresses:
        yield addresses


@pytest.fixture(scope="session")
def classifier():
    # F32: no calibration pass, so it quantizes in a moment.
    with served("minilm-classifier-test", precision="f32") as addresses:
        yield addresses
