"""The Embed RPC: texts in, one vector per text out, from an embedding model the manager loads."""

from __future__ import annotations

import asyncio
import time

import grpc

from tokenwire.server.engine.embedder import Embedder, EmbeddingError
from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.server.models.store import ModelEntry
from tokenwire.v1 import inference_pb2 as pb

from .errors import DOMAIN_ERRORS, abort_for

MAX_INPUTS = 2048
MAX_INPUT_BYTES = 1 << 20  # all the texts of one request together


def embedding_entry(models: ModelManager, name: str) -> ModelEntry:
    """The model asked for (which must make embeddings), or the store's first embedding model
    (one scan of the store either way)."""
    entries = models.store.scan()
    ids = sorted(e.id for e in entries if e.kind == "embedding" and not e.error)
    if not name and not ids:
        raise ModelNotFound("(default embedding model)", [e.id for e in entries])
    entry = models.store.find(name or ids[0], entries)
    if entry is None:
        raise ModelNotFound(name, [e.id for e in entries])
    if entry.kind != "embedding":
        raise InvalidRequest(f"model {entry.id} generates text and makes no embeddings; embedding models: "
                             f"{', '.join(ids) or 'none (tokenwire pull all-minilm-l6-v2)'}", "model")
    return entry


def check_inputs(request: pb.EmbedRequest) -> list[str]:
    texts = list(request.input)
    if not texts:
        raise InvalidRequest("input must hold at least one text", "input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", "input")
    size = sum(len(t.encode()) for t in texts)
    if size > MAX_INPUT_BYTES:
        raise InvalidRequest(f"inputs are {size} bytes together; at most {MAX_INPUT_BYTES}", "input",
                             "PROMPT_TOO_LARGE")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"input[{i}] is empty", f"input[{i}]")
    return texts


async def embed(models: ModelManager, request: pb.EmbedRequest, context: grpc.aio.ServicerContext,
                keep_alive: float | None) -> pb.EmbedResponse:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    model = None
    try:
        texts = check_inputs(request)
        entry = await loop.run_in_executor(None, embedding_entry, models, request.model)
        model = await models.acquire_async(entry)
        encoder = model.scheduler
        assert isinstance(encoder, Embedder)
        vectors, tokens = await loop.run_in_executor(models.pool, encoder.embed, texts, request.dimensions)
    except EmbeddingError as exc:
        await abort_for(context, InvalidRequest(str(exc), exc.field))
    except DOMAIN_ERRORS as exc:
        await abort_for(context, exc)
    finally:
        if model is not None:
            models.release(model, keep_alive)
    return pb.EmbedResponse(model=entry.id, embeddings=[pb.Embedding(values=v.tolist()) for v in vectors],
                            prompt_tokens=tokens, total_time_ms=(time.perf_counter() - started) * 1000)
