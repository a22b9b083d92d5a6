"""Structured outputs over gRPC on the real model (the compatibility issue, items 1-2): a JSON Schema
with nested objects, arrays and enums holds on 5 prompts; json_object parses; a regex and a choice
match; a malformed constraint is CONSTRAINT_INVALID before anything loads; constrained and free
rows share one batch, and the free ones answer as they would alone."""

from __future__ import annotations

import json
import re
import threading

import grpc
import jsonschema
import pytest

from tokenwire.v1 import inference_pb2 as pb

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                    "required": ["city"], "additionalProperties": False},
        "status": {"enum": ["active", "inactive"]},
    },
    "required": ["name", "age", "tags", "address", "status"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Make up a customer record.", "Who lives in Paris? Answer in JSON.",
           "Give me a user profile.", "A JSON object about a retired teacher, please."]


def run(stub, sampling: pb.SamplingParams, prompt: str, max_tokens: int = 160) -> tuple[str, pb.Finished]:
    request = pb.GenerateRequest(model="smollm2-135m", messages=[pb.ChatMessage(role="user", content=prompt)],
                                 max_tokens=max_tokens, sampling=sampling)
    text, finished = [], None
    for response in stub.Generate(request, timeout=300):
        if response.HasField("token"):
            text.append(response.token.text)
        elif response.HasField("finished"):
            finished = response.finished
    return "".join(text), finished


def test_a_json_schema_holds_on_five_prompts(stub) -> None:
    for i, prompt in enumerate(PROMPTS):
        sampling = pb.SamplingParams(json_schema=json.dumps(SCHEMA), temperature=0.8 if i % 2 else 0.0, seed=i)
        text, finished = run(stub, sampling, prompt, max_tokens=300)
        assert finished.reason == pb.FINISH_REASON_STOP, (prompt, text)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_and_choice(stub) -> None:
    text, finished = run(stub, pb.SamplingParams(json_object=True, temperature=0), "Say hello in JSON.", 120)
    assert finished.reason == pb.FINISH_REASON_STOP and isinstance(json.loads(text), dict), text
    text, _ = run(stub, pb.SamplingParams(regex=r"\d{3}-\d{4}", temperature=0.7, seed=3), "A phone number?")
    assert re.fullmatch(r"\d{3}-\d{4}", text), text
    choices = ["yes", "no", "maybe later"]
    text, finished = run(stub, pb.SamplingParams(choice=pb.ChoiceConstraint(options=choices), temperature=0),
                         "Will it rain?")
    assert text in choices and finished.reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("sampling", [
    pb.SamplingParams(json_schema="{not json"),
    pb.SamplingParams(json_schema=json.dumps({"type": "object", "uniqueItems": True, "not": {}})),
    pb.SamplingParams(regex="(unclosed"),
    pb.SamplingParams(choice=pb.ChoiceConstraint()),
])
def test_a_malformed_constraint_is_refused(stub, sampling) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        run(stub, sampling, "hi")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    kind = sampling.WhichOneof("constraint")
    assert kind in refused.value.details() or "choice" in refused.value.details()


def test_constrained_and_free_rows_share_a_batch(stub) -> None:
    free = pb.SamplingParams(temperature=0)
    alone, _ = run(stub, free, "Count to five.", 24)
    results: dict[str, str] = {}

    def go(name: str, sampling: pb.SamplingParams, prompt: str) -> None:
        results[name] = run(stub, sampling, prompt, 300 if name.startswith("json") else 24)[0]

    threads = [threading.Thread(target=go, args=("free", free, "Count to five.")),
               *(threading.Thread(target=go, args=(f"json{i}", pb.SamplingParams(
                   json_schema=json.dumps(SCHEMA), temperature=0), PROMPTS[i])) for i in range(3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["free"] == alone, "a free row is untouched by the constrained rows beside it"
    for i in range(3):
        jsonschema.validate(json.loads(results[f"json{i}"]), SCHEMA)
