"""The gRPC API through a Python client generated at test time from proto/tei.proto with
grpcio-tools (nothing generated is committed), against the real server: results equal to the
HTTP routes, TEI's streaming variants, auth in metadata, errors as gRPC status codes, the
standard health service, and the calls counted in /metrics.
"""

import importlib
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import API_KEY, ROOT, cosines, embed, post, rerank
from grpc_health.v1 import health_pb2, health_pb2_grpc

AUTH = (("authorization", f"Bearer {API_KEY}"),)
TEXTS = ["What is Kubernetes?", "A container orchestrator.", "Zürich liegt am Zürichsee."]


@pytest.fixture(scope="session")
def tei():
    """The generated modules `tei_pb2` and `tei_pb2_grpc`."""
    out = tempfile.mkdtemp()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(ROOT / "proto/tei.proto")],
        check=True,
    )
    sys.path.insert(0, out)
    return importlib.import_module("tei_pb2"), importlib.import_module("tei_pb2_grpc")


def channel(target):
    return grpc.insecure_channel(target)


def test_embed_tokenize_and_info_match_http(embedder, tei):
    pb, stubs = tei
    base, target = embedder
    with channel(target) as ch:
        info = stubs.InfoStub(ch).Info(pb.InfoRequest(), metadata=AUTH)
        assert info.model_id == "all-MiniLM-L6-v2"
        assert info.model_type == pb.MODEL_TYPE_EMBEDDING
        assert info.max_input_length == 256

        stub = stubs.EmbedStub(ch)
        one = stub.Embed(pb.EmbedRequest(inputs=TEXTS[0], normalize=True), metadata=AUTH)
        np.testing.assert_array_equal(np.array(one.embeddings, np.float32), embed(base, TEXTS[:1])[0])
        assert one.metadata.compute_tokens > 2
        streamed = list(stub.EmbedStream(iter(pb.EmbedRequest(inputs=t, normalize=True) for t in TEXTS),
                                         metadata=AUTH))
        got = np.array([r.embeddings for r in streamed], np.float32)
        assert cosines(got, embed(base, TEXTS)).min() >= 0.9999
        short = stub.Embed(pb.EmbedRequest(inputs=TEXTS[1], normalize=True, dimensions=64), metadata=AUTH)
        np.testing.assert_allclose(short.embeddings, embed(base, TEXTS[1:2], dimensions=64)[0], rtol=1e-6)
        every = stub.EmbedAll(pb.EmbedAllRequest(inputs=TEXTS[0]), metadata=AUTH)
        want = post(base, "/embed_all", {"inputs": TEXTS[0]})[0]
        np.testing.assert_allclose([t.embeddings for t in every.token_embeddings], want, rtol=1e-6)
        left = stub.Embed(pb.EmbedRequest(inputs="word " * 400, truncate=True, normalize=True,
                                          truncation_direction=pb.TRUNCATION_DIRECTION_LEFT), metadata=AUTH)
        want = embed(base, ["word " * 400], truncate=True, truncation_direction="left")[0]
        np.testing.assert_allclose(left.embeddings, want, rtol=1e-6)

        tokenize = stubs.TokenizeStub(ch)
        tokens = tokenize.Tokenize(pb.EncodeRequest(inputs="Héllo", add_special_tokens=True), metadata=AUTH)
        want = post(base, "/tokenize", {"inputs": "Héllo"})[0]
        assert [(t.id, t.text, t.special) for t in tokens.tokens] == [(t["id"], t["text"], t["special"]) for t in want]
        decoded = tokenize.Decode(pb.DecodeRequest(ids=[t.id for t in tokens.tokens], skip_special_tokens=True),
                                  metadata=AUTH)
        assert decoded.text == "hello"
        streamed = list(tokenize.TokenizeStream(iter(pb.EncodeRequest(inputs=t) for t in TEXTS), metadata=AUTH))
        assert len(streamed) == 3

        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    assert 'route="/tei.v1.Embed/Embed",status="Ok"' in metrics


def test_rerank_and_its_stream_match_http(reranker, tei):
    pb, stubs = tei
    base, target = reranker
    query, texts = "What is the capital of France?", ["Paris is the capital of France.",
                                                      "Rust has no garbage collector.",
                                                      "France's capital city is Paris."]
    want = rerank(base, query, texts)
    with channel(target) as ch:
        stub = stubs.RerankStub(ch)
        ranked = stub.Rerank(pb.RerankRequest(query=query, texts=texts, return_text=True), metadata=AUTH)
        assert [(r.index, pytest.approx(r.score, rel=1e-6)) for r in ranked.ranks] == want
        assert ranked.ranks[0].text == texts[want[0][0]]
        streamed = stub.RerankStream(iter(pb.RerankStreamRequest(query=query, text=t) for t in texts),
                                     metadata=AUTH)
        assert [r.index for r in streamed.ranks] == [i for i, _ in want]


def test_predict_matches_http(classifier, tei):
    pb, stubs = tei
    base, target = classifier
    text = "You are all idiots and this is spam."
    want = post(base, "/predict", {"inputs": text})
    with channel(target) as ch:
        got = stubs.PredictStub(ch).Predict(pb.PredictRequest(inputs=text), metadata=AUTH)
        assert [(p.label, pytest.approx(p.score, rel=1e-6)) for p in got.predictions] == [
            (p["label"], p["score"]) for p in want
        ]
        pair = stubs.PredictStub(ch).PredictPair(pb.PredictPairRequest(inputs=["q", "a"]), metadata=AUTH)
        assert len(pair.predictions) == 3


def test_errors_are_grpc_status_codes(embedder, tei):
    pb, stubs = tei
    _, target = embedder
    with channel(target) as ch:
        embed_stub = stubs.EmbedStub(ch)
        cases = [
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="a")), grpc.StatusCode.UNAUTHENTICATED),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="a"), metadata=(("authorization", "Bearer no"),)),
             grpc.StatusCode.UNAUTHENTICATED),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs=""), metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="a", prompt_name="nope"), metadata=AUTH),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="a", dimensions=999), metadata=AUTH),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="word " * 400), metadata=AUTH),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: embed_stub.Embed(pb.EmbedRequest(inputs="a", truncation_direction=7), metadata=AUTH),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stubs.RerankStub(ch).Rerank(pb.RerankRequest(query="q", texts=["a"]), metadata=AUTH),
             grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: stubs.PredictStub(ch).Predict(pb.PredictRequest(inputs="a"), metadata=AUTH),
             grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: embed_stub.EmbedSparse(pb.EmbedSparseRequest(inputs="a"), metadata=AUTH),
             grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: stubs.TokenizeStub(ch).Decode(pb.DecodeRequest(ids=[101, 99999]), metadata=AUTH),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: list(embed_stub.EmbedStream(iter([pb.EmbedRequest(inputs="a"), pb.EmbedRequest(inputs="")]),
                                                 metadata=AUTH)),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for i, (call, code) in enumerate(cases):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code, f"case {i}: {e.value.code()} {e.value.details()}"
            assert e.value.details(), f"case {i}: no message"
