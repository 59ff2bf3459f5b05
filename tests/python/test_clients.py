"""The official Python clients against the real server: `openai` (float and base64
encodings) and `huggingface_hub.InferenceClient` (feature extraction), compared with /embed.

Needs `target/release/qmodel-server` (cargo build --release -p qmodel-server, or set
QMODEL_SERVER) and models/cache/all-MiniLM-L6-v2 (models/fetch). Either missing is a failure,
never a skip. Dependencies: tests/requirements.txt (installed by tests/python-env) (numpy: huggingface_hub returns arrays).
"""

import base64
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
from huggingface_hub import InferenceClient
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("QMODEL_SERVER", ROOT / "target/release/qmodel-server"))
CHECKPOINT = ROOT / "models/cache/all-MiniLM-L6-v2"
API_KEY = "python-client-key"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zürich liegt am Zürichsee.",
    "fn main() { println!(\"hello\"); }",
]


@pytest.fixture(scope="module")
def server():
    assert BINARY.exists(), f"{BINARY} is missing: run `cargo build --release -p qmodel-server`"
    assert (CHECKPOINT / "model.safetensors").exists(), f"{CHECKPOINT} is missing: run models/fetch"
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "minilm-int8"
        subprocess.run(
            [BINARY, "quantize", "--from", CHECKPOINT, "--out", artifact, "--precision", "int8"],
            check=True,
            capture_output=True,
        )
        env = dict(os.environ, MODEL_DIR=str(artifact), HOST="127.0.0.1", PORT="0",
                   API_KEY=API_KEY, RUST_LOG="info", JSON_OUTPUT="false")
        proc = subprocess.Popen([BINARY, "serve"], env=env, stdout=subprocess.PIPE, text=True)
        try:
            base = None
            for line in proc.stdout:
                if "listening addr=" in line:
                    base = "http://" + line.split("listening addr=")[1].strip()
                    break
            assert base, "the server exited before listening"
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
            yield base
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0


def embed(base, texts):
    request = urllib.request.Request(
        base + "/embed",
        data=json.dumps({"inputs": texts}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    return np.array(json.load(urllib.request.urlopen(request)), dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_embeddings_match_embed(server, encoding_format):
    client = OpenAI(base_url=server + "/v1", api_key=API_KEY)
    response = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=TEXTS, encoding_format=encoding_format
    )
    assert response.model == "all-MiniLM-L6-v2"
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    if encoding_format == "base64":
        # Asked for explicitly, the client hands back OpenAI's wire form: little-endian f32.
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in response.data])
    else:
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 384)
    # Both encodings carry the exact f32 values.
    np.testing.assert_array_equal(got, embed(server, TEXTS))
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS) * 2


def test_openai_client_default_encoding_and_a_single_string(server):
    # The client asks for base64 when no format is given, and decodes it itself.
    client = OpenAI(base_url=server + "/v1", api_key=API_KEY)
    response = client.embeddings.create(model="x", input=TEXTS[1])
    np.testing.assert_array_equal(
        np.array(response.data[0].embedding, dtype=np.float32), embed(server, [TEXTS[1]])[0]
    )


def test_openai_client_sees_a_wrong_key_as_an_authentication_error(server):
    import openai

    client = OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="x", input="hello")


def test_huggingface_feature_extraction_matches_embed(server):
    client = InferenceClient(base_url=server, api_key=API_KEY)
    got = client.feature_extraction(TEXTS[0])
    assert got.shape == (1, 384)
    np.testing.assert_array_equal(got.astype(np.float32), embed(server, [TEXTS[0]]))
    np.testing.assert_allclose(np.linalg.norm(got[0]), 1.0, rtol=1e-5)
