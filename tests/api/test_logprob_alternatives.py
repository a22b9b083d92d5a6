"""top_logprobs and logit_bias on the real model (the compatibility issue, item 4), against a
reference computed here from the same engine's logits: the alternatives at each greedy step are
the reference's likeliest, with their log_softmax values; a -100 bias on the reference's choice
makes greedy take its runner-up, and +100 forces a token; through the OpenAI SDK both endpoints
answer in OpenAI's shapes, and a token id past the vocabulary is a 400 naming logit_bias."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from tokenwire.server.engine.graph import open_engine
from tokenwire.server.engine.sampling import log_softmax
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb

PROMPT = "The capital of France is"
STEPS = 4


@pytest.fixture(scope="module")
def reference(int4_dir: Path) -> list[np.ndarray]:
    """The log_softmax of each greedy step's logits (float32, as the engine samples)."""
    engine, _ = open_engine(int4_dir, context_length=64)
    state = engine.new_prefill()
    logits = engine.prefill(state, TokenizerBundle(int4_dir).encode(PROMPT)).copy()
    engine.join(state)
    out = []
    for _ in range(STEPS):
        logprobs = log_softmax(logits.astype(np.float32))
        out.append(logprobs)
        logits = engine.step([int(np.argmax(logprobs))])[0].copy()
    return out


def generate(stub, **fields) -> list[pb.TokenDelta]:
    sampling = fields.pop("sampling", pb.SamplingParams(temperature=0))
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=STEPS, ignore_eos=True, sampling=sampling, **fields)
    return [r.token for r in stub.Generate(request, timeout=120) if r.WhichOneof("event") == "token" and
            r.token.index < STEPS]


def test_alternatives_are_the_references_likeliest(stub, reference) -> None:
    tokens = generate(stub, include_logprobs=True, top_logprobs=5)
    assert len(tokens) == STEPS
    for token, logprobs in zip(tokens, reference, strict=True):
        best = np.argsort(-logprobs, kind="stable")[:5]
        assert [t.token_id for t in token.top_logprobs] == [int(i) for i in best]
        assert [t.logprob for t in token.top_logprobs] == pytest.approx([float(logprobs[i]) for i in best], abs=1e-3)
        assert token.top_logprobs[0].token_id == token.token_id and token.top_logprobs[0].logprob == token.logprob
        assert token.top_logprobs[1].logprob < -0.5 or token.top_logprobs[4].logprob < -2, "not a flat constant"
    assert not generate(stub, include_logprobs=True)[0].top_logprobs, "none unless asked"


def test_a_bias_moves_greedy_to_the_runner_up_or_forces_a_token(stub, reference) -> None:
    first, runner_up = (int(i) for i in np.argsort(-reference[0], kind="stable")[:2])
    banned = generate(stub, sampling=pb.SamplingParams(temperature=0, logit_bias={first: -100}))
    assert banned[0].token_id == runner_up
    forced = 1234
    pushed = generate(stub, sampling=pb.SamplingParams(temperature=0, logit_bias={forced: 100}))
    assert [t.token_id for t in pushed] == [forced] * STEPS


def test_a_token_past_the_vocabulary_is_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, sampling=pb.SamplingParams(logit_bias={10**8: 1}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in caught.value.details()


def test_openai_shapes_of_alternatives_and_bias(bridge) -> None:
    client = OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == list(entry.token.encode())
    completion = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3, temperature=0,
                                           logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == 3
    assert all(len(top) <= 2 and tok in top for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True))
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=1, logit_bias={"999999999": 5})
    assert caught.value.body["param"] == "logit_bias" and "vocabulary" in caught.value.body["message"]


def test_n_choices_over_grpc_share_the_prompt_and_sample_apart(stub) -> None:
    """n=3: three choices, each ended by its own Finished; with a seed each samples with seed + i, so
    choice i equals a single request seeded seed + i; the prompt is computed once (the others
    reuse all but its last token from the prefix cache)."""
    sampling = pb.SamplingParams(temperature=1.0, seed=41)
    request = pb.GenerateRequest(prompt="Once upon a time, in a faraway kingdom,", max_tokens=8, ignore_eos=True,
                                 sampling=sampling, n=3)
    texts, finished = {0: "", 1: "", 2: ""}, {}
    for response in stub.Generate(request, timeout=120):
        kind = response.WhichOneof("event")
        if kind == "token":
            texts[response.token.choice] += response.token.text
        elif kind == "finished":
            finished[response.finished.choice] = response.finished
    assert sorted(finished) == [0, 1, 2] and all(f.usage.completion_tokens == 8 for f in finished.values())
    assert len(set(texts.values())) == 3, texts
    prompt_tokens = finished[0].usage.prompt_tokens
    assert sorted(f.usage.cached_prompt_tokens for f in finished.values())[1:] == [prompt_tokens - 1] * 2
    for i in range(3):
        alone = pb.GenerateRequest(prompt=request.prompt, max_tokens=8, ignore_eos=True,
                                   sampling=pb.SamplingParams(temperature=1.0, seed=41 + i))
        assert "".join(r.token.text for r in stub.Generate(alone, timeout=120) if r.WhichOneof("event") == "token") \
            == texts[i]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(prompt="x", n=9), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be 1 to 8" in caught.value.details()
