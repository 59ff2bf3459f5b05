"""The official Python clients against the real server, unchanged, compared with the TEI
routes: `openai` (float and base64, the client's base64 default, `dimensions`, token arrays,
1000 inputs, /v1/models), `huggingface_hub.InferenceClient` (feature extraction), langchain's
`OpenAIEmbeddings`, llama-index's `TextEmbeddingsInference` embeddings and TEI rerank
postprocessor, Cohere's `ClientV2.rerank`, and haystack's `HuggingFaceAPITextEmbedder` for TEI.
The server and helpers are in conftest.py; dependencies in tests/requirements.txt.
"""

import base64

import numpy as np
import openai
import pytest
from conftest import API_KEY, cosines, embed, post, rerank
from huggingface_hub import InferenceClient
from openai import OpenAI

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zürich liegt am Zürichsee.",
    "fn main() { println!(\"hello\"); }",
]
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "France's capital city is Paris, on the Seine.",
    "Rust has no garbage collector.",
    "Berlin is the capital of Germany.",
]


def many_texts(n):
    return [f"Sentence number {i} is about {['cats', 'rust', 'markets', 'rain'][i % 4]}." for i in range(n)]


def openai_client(base, key=API_KEY, **kwargs):
    return OpenAI(base_url=base + "/v1", api_key=key, **kwargs)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_embeddings_match_embed(embedder, encoding_format):
    base, _ = embedder
    response = openai_client(base).embeddings.create(
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
    np.testing.assert_array_equal(got, embed(base, TEXTS))
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS) * 2


def test_openai_client_default_encoding_and_a_single_string(embedder):
    # The client asks for base64 when no format is given, and decodes it itself.
    base, _ = embedder
    response = openai_client(base).embeddings.create(model="x", input=TEXTS[1], user="user-7")
    np.testing.assert_array_equal(
        np.array(response.data[0].embedding, dtype=np.float32), embed(base, [TEXTS[1]])[0]
    )


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_thousand_inputs_beyond_the_client_batch_size(embedder, encoding_format):
    base, _ = embedder
    texts = many_texts(1000)
    kwargs = {"encoding_format": encoding_format} if encoding_format == "float" else {}
    response = openai_client(base).embeddings.create(model="x", input=texts, **kwargs)
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert got.shape == (1000, 384)
    # /embed takes 32 at a time (MAX_CLIENT_BATCH_SIZE).
    want = np.concatenate([embed(base, texts[i:i + 32]) for i in range(0, 1000, 32)])
    assert cosines(got, want).min() >= 0.9999


def test_openai_dimensions_and_token_arrays(embedder):
    base, _ = embedder
    client = openai_client(base)
    short = client.embeddings.create(model="x", input=TEXTS, dimensions=128).data
    want = embed(base, TEXTS, dimensions=128)
    got = np.array([d.embedding for d in short], dtype=np.float32)
    assert got.shape == (3, 128)
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # Token arrays (as langchain sends them), in the server's vocabulary.
    ids = [[t["id"] for t in tokens] for tokens in post(base, "/tokenize", {"inputs": TEXTS})]
    from_ids = client.embeddings.create(model="x", input=ids).data
    got = np.array([d.embedding for d in from_ids], dtype=np.float32)
    assert cosines(got, embed(base, TEXTS)).min() >= 0.9999
    one = client.embeddings.create(model="x", input=ids[0]).data
    assert cosines([one[0].embedding], embed(base, TEXTS[:1])).min() >= 0.9999


def test_openai_client_errors(embedder):
    base, _ = embedder
    with pytest.raises(openai.AuthenticationError):
        openai_client(base, key="wrong", max_retries=0).embeddings.create(model="x", input="hello")
    client = openai_client(base, max_retries=0)
    for bad in [
        {"input": "hello", "dimensions": 385},
        {"input": [[101, 30522]]},
        {"input": many_texts(2049)},
        {"input": ""},
    ]:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.embeddings.create(model="x", **bad)
        assert e.value.response.json()["error_type"] == "validation", bad
    models = client.models.list()
    assert [m.id for m in models.data] == ["all-MiniLM-L6-v2"]


def test_huggingface_feature_extraction_matches_embed(embedder):
    base, _ = embedder
    client = InferenceClient(base_url=base, api_key=API_KEY)
    got = client.feature_extraction(TEXTS[0])
    assert got.shape == (1, 384)
    np.testing.assert_array_equal(got.astype(np.float32), embed(base, [TEXTS[0]]))
    np.testing.assert_allclose(np.linalg.norm(got[0]), 1.0, rtol=1e-5)


def test_langchain_openai_embeddings(embedder):
    from langchain_openai import OpenAIEmbeddings

    base, _ = embedder
    texts = many_texts(1000)
    embeddings = OpenAIEmbeddings(
        model="all-MiniLM-L6-v2", base_url=base + "/v1", api_key=API_KEY,
        check_embedding_ctx_length=False,
    )
    got = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    want = np.concatenate([embed(base, texts[i:i + 32]) for i in range(0, 1000, 32)])
    assert got.shape == (1000, 384)
    assert cosines(got, want).min() >= 0.9999
    query = np.array(embeddings.embed_query(TEXTS[0]), dtype=np.float32)
    assert cosines([query], embed(base, TEXTS[:1])).min() >= 0.9999


class ServerVocabulary:
    """Stands in for tiktoken's encoding, whose files cannot be fetched here: the server's own
    tokenizer (through /tokenize), so the ids langchain sends are ids of the served model."""

    def __init__(self, base):
        self.base = base

    def encode_ordinary(self, text):
        return [t["id"] for t in post(self.base, "/tokenize", {"inputs": text})[0]]

    def encode(self, text, **_special_token_options):
        return self.encode_ordinary(text)


def test_langchain_openai_token_id_mode(embedder, monkeypatch):
    # langchain's default mode tokenizes with tiktoken and sends token arrays, 1000 a request.
    import langchain_openai.embeddings.base as langchain_base
    from langchain_openai import OpenAIEmbeddings

    base, _ = embedder
    vocabulary = ServerVocabulary(base)
    monkeypatch.setattr(langchain_base.tiktoken, "encoding_for_model", lambda _: vocabulary)
    monkeypatch.setattr(langchain_base.tiktoken, "get_encoding", lambda _: vocabulary)
    texts = many_texts(40)
    embeddings = OpenAIEmbeddings(
        model="all-MiniLM-L6-v2", base_url=base + "/v1", api_key=API_KEY, chunk_size=16,
    )
    got = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    want = np.concatenate([embed(base, texts[i:i + 32]) for i in range(0, 40, 32)])
    assert cosines(got, want).min() >= 0.9999


def test_llama_index_tei_embeddings(embedder):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    base, _ = embedder
    model = TextEmbeddingsInference(model_name="all-MiniLM-L6-v2", base_url=base, auth_token=API_KEY,
                                    embed_batch_size=8)
    texts = many_texts(20)
    got = np.array(model.get_text_embedding_batch(texts), dtype=np.float32)
    assert cosines(got, embed(base, texts)).min() >= 0.9999
    query = model.get_query_embedding(TEXTS[0])
    assert cosines([query], embed(base, TEXTS[:1])).min() >= 0.9999


def test_llama_index_tei_rerank_postprocessor(reranker):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    base, _ = reranker
    # This client sends the header value as given.
    postprocessor = TextEmbeddingInference(base_url=base, top_n=3, auth_token=f"Bearer {API_KEY}")
    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCUMENTS]
    kept = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    want = rerank(base, QUERY, DOCUMENTS)[:3]
    assert [n.node.text for n in kept] == [DOCUMENTS[i] for i, _ in want]
    np.testing.assert_allclose([n.score for n in kept], [s for _, s in want], rtol=1e-6)


def test_cohere_client_v2_rerank(reranker):
    import cohere

    base, _ = reranker
    client = cohere.ClientV2(api_key=API_KEY, base_url=base)
    response = client.rerank(model="minilm-reranker-test", query=QUERY, documents=DOCUMENTS, top_n=3)
    want = rerank(base, QUERY, DOCUMENTS)
    assert [(r.index, r.relevance_score) for r in response.results] == [
        (i, pytest.approx(s, rel=1e-6)) for i, s in want[:3]
    ]
    assert response.id
    everything = client.rerank(model="m", query=QUERY, documents=DOCUMENTS)
    assert [r.index for r in everything.results] == [i for i, _ in want]
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        client.rerank(model="m", query=QUERY, documents=[])
    assert e.value.status_code == 422
    bad_key = cohere.ClientV2(api_key="wrong", base_url=base)
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        bad_key.rerank(model="m", query=QUERY, documents=DOCUMENTS)
    assert e.value.status_code == 401


def test_haystack_tei_text_embedder(embedder):
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import HuggingFaceAPITextEmbedder

    base, _ = embedder
    component = HuggingFaceAPITextEmbedder(
        api_type="text_embeddings_inference", api_params={"url": base},
        token=Secret.from_token(API_KEY), prefix="passage: ",
    )
    component.warm_up()
    got = component.run(text=TEXTS[2])["embedding"]
    assert cosines([got], embed(base, ["passage: " + TEXTS[2]])).min() >= 0.9999
