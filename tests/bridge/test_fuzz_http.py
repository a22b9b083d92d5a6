"""The bridge's HTTP surface under schemathesis, driven by the bridge's own /openapi.json (Security
issue: "kept fixed, by tests that attack").

Every documented operation gets generated requests, valid and invalid (bodies, query and path
parameters, the X-Request-Id header), over real sockets against a real server and bridge of this
module's own. What must hold for each answer:

* never a 500 or 502, and a 503/504 only where the operation documents one;
* the status, the content type and the body are the documented ones (errors: the Error shape);
* a request the schema calls valid is accepted (2xx, or 404 for a chat or model that does not
  exist), and one it calls invalid is refused with a 4xx.

Afterwards the server still generates, and a chat committed before the fuzz reads back unchanged.
That chat belongs to another API key's user, so however the fuzz creates, renames and deletes
chats (schemathesis reuses ids it saw in responses), it never sees that one.

Budget: `TOKENWIRE_FUZZ_EXAMPLES` generated cases per operation and mode (default 8) plus
schemathesis' coverage cases, about a minute in all; `TOKENWIRE_FUZZ_SEED` picks the seed (a
fixed default keeps the suite deterministic; set another to explore).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import DEFAULT_INT4, Proc, cli, start_bridge, start_server
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from tokenwire.bridge.openapi import DOCUMENT

EXAMPLES = int(os.environ.get("TOKENWIRE_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("TOKENWIRE_FUZZ_SEED", "20261201"))
# Generated requests may ask for up to 2^32 tokens: the fuzz caps what it sends to this many, so a
# generation costs milliseconds (the cap keeps a valid request valid and leaves invalid values alone).
MAX_TOKENS = 1
KEEP_ALIVE_S = 60
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
_GENERATING = {("POST", "/api/generate"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
               ("POST", "/api/chats/{chat_id}/messages")}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance]
# Cases sent, by operation, mode and status: printed at the end (pytest -s) for the record.
TRIED: Counter[tuple[str, str, int]] = Counter()
SECONDS: Counter[str] = Counter()  # time spent waiting for answers, by operation
_TURN = itertools.count()

# schemathesis makes one item per operation, all with this test's node id: pytest-xdist would run
# only one of them, so the file runs in `make test`'s serial step (the "serial" marker).
pytestmark = pytest.mark.serial


@dataclass
class Stack:
    server: Proc
    bridge: Proc
    fuzz_key: str  # the user the fuzz runs as
    keeper_key: str  # the user whose chat must survive it
    kept_chat: dict[str, Any]  # GET /api/chats/{id} of the keeper's chat, before the fuzz
    own_chat: str  # a chat of the fuzz user's, which every other case about a chat is pointed at


def _http(method: str, url: str, body: dict | None = None, key: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def fuzz_stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fuzz-http")
    db = str(tmp / "chats.db")
    keys = {}
    for user in ("fuzzer", "keeper"):
        done = subprocess.run(cli("keys", "create", user, "--database", db), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        keys[user] = done.stdout.strip()
    # Two users: the fuzz runs as one, the chat that must survive it belongs to the other.
    server = start_server(tmp, models_dir, "--database", db, "--metrics-port", "0", "--max-running", "4")
    bridge = start_bridge(tmp, server.target)
    try:
        status, chat = _http("POST", bridge.url + "/api/chats", {"model": DEFAULT_INT4, "system": "Be brief."},
                             keys["keeper"])
        assert status == 201, chat
        status, _ = _http("POST", f"{bridge.url}/api/chats/{chat['id']}/messages",
                          {"content": "Name a fruit.", "temperature": 0, "max_tokens": 4}, keys["keeper"])
        assert status == 200
        status, kept = _http("GET", f"{bridge.url}/api/chats/{chat['id']}", key=keys["keeper"])
        assert status == 200 and len(kept["messages"]) == 3, kept
        status, served = _http("GET", bridge.url + "/openapi.json")
        assert status == 200 and served == json.loads(json.dumps(DOCUMENT))  # the fuzz attacks what is served
        status, own = _http("POST", bridge.url + "/api/chats", {"model": DEFAULT_INT4}, keys["fuzzer"])
        assert status == 201, own
        yield Stack(server, bridge, keys["fuzzer"], keys["keeper"], kept, own["id"])
    finally:
        bridge.stop()
        server.stop()


CONFIG = SchemathesisConfig.from_dict({
    "seed": SEED,
    "generation": {"max-examples": EXAMPLES, "database": "none",
                   # The fuzz user's key goes with every case (below): no generated Authorization.
                   "with-security-parameters": False},
    "checks": {
        # 503/504 are not server errors here: status_code_conformance says where they are documented.
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
        # A valid request for a chat or model that does not exist answers 404; nothing else refuses one.
        # 503: the model is being unloaded (a case before asked keep_alive 0): documented, retry later.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "404", "503"]},
        "negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413", "415"]},
    },
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 60,
})
# The document the bridge serves at /openapi.json (the fixture checks that it is this one): loaded at
# import, so that every operation is a test of its own.
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(DOCUMENT)), config=CONFIG)


def _within_budget(case: schemathesis.Case) -> None:
    """At most MAX_TOKENS tokens per generation (absent counts too: the server's default is 1024), and
    a keep_alive of at least KEEP_ALIVE_S (a generated 0 unloads the model, and the next case waits for
    a reload or gets a 503). Both keep a valid request valid and leave invalid values alone."""
    if (case.operation.method.upper(), case.operation.path) not in _GENERATING or not isinstance(case.body, dict):
        return
    for name in _TOKEN_FIELDS:
        value = case.body.get(name)  # an integer, or a float with no fraction (also an integer to JSON Schema)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_TOKENS:
            case.body[name] = MAX_TOKENS
    if not any(name in case.body for name in _TOKEN_FIELDS):
        case.body["max_tokens"] = MAX_TOKENS
    keep_alive = case.body.get("keep_alive")
    if isinstance(keep_alive, int | float) and not isinstance(keep_alive, bool) and 0 <= keep_alive < KEEP_ALIVE_S:
        case.body["keep_alive"] = KEEP_ALIVE_S


@schema.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, fuzz_stack: Stack) -> None:
    _within_budget(case)
    checks = CHECKS
    params = case.path_parameters or {}
    # Random ids only ever reach "no such chat": every other case goes to a chat that exists (not for
    # DELETE, which would end that early), when its id is one the schema calls valid.
    if (re.fullmatch("[0-9a-f]{16}", str(params.get("chat_id", ""))) and case.operation.method.upper() != "DELETE"
            and next(_TURN) % 2):
        params["chat_id"] = fuzz_stack.own_chat
        if case.operation.path.endswith("/messages") and not (isinstance(case.body, dict) and case.body.get("content")):
            # Without content the chat's last user message is answered again: a 400 when the chat does not
            # end with one (stated in words in the document).
            checks = [c for c in checks if c is not positive_data_acceptance]
    query = case.query or {}
    body = case.body if isinstance(case.body, dict) else {}
    if (case.operation.path == "/api/chats" and query.get("cursor")
            # The file must be audio the server can decode, and the language one the model knows
            # (both stated in words: no schema says which bytes decode).
            or case.operation.path == "/v1/audio/transcriptions"
            or case.operation.path == "/api/chats/search" and not re.search(r"\w", str(query.get("q", "")))
            or isinstance(body.get("response_format"), dict)
            and body["response_format"].get("type") in ("json_schema", "regex", "choice", "grammar")
            or body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none", "auto")
            or body.get("function_call") not in (None, "none", "auto") or body.get("logit_bias")
            or body.get("top_logprobs") and body.get("logprobs") is not True
            or body.get("images") or body.get("tool_results") or _has_image_parts(body)):
        # Refusals (400) the document states in words, not as a schema: a cursor is a token the server
        # gave out, a search needs a word (Unicode \w, which no JSON Schema pattern dialect shares), and
        # a response_format's schema, regex or grammar must be one the grammar engine can compile (a
        # JSON Schema cannot say which strings are valid regexes or grammars); likewise tools' parameter
        # schemas, and a tool_choice (function_call) must name one of the request's tools (functions);
        # logit_bias may name only the model's own token ids; top_logprobs needs logprobs; an image must
        # be one Pillow can read (and only user messages hold one); a tool result must answer a call of
        # the chat.
        checks = [c for c in checks if c is not positive_data_acceptance]
    mode = case.meta.generation.mode.value if case.meta else "explicit"
    sent = time.monotonic()
    response = case.call(base_url=fuzz_stack.bridge.url, headers={"Authorization": f"Bearer {fuzz_stack.fuzz_key}"})
    SECONDS[case.operation.label] += time.monotonic() - sent
    TRIED[(case.operation.label, mode, response.status_code)] += 1
    case.validate_response(response, checks=checks)


def _has_image_parts(body: dict) -> bool:
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(part, dict) and part.get("type") == "image_url" for part in m["content"])
               for m in messages)


def test_the_server_still_serves_after_the_fuzz(fuzz_stack: Stack) -> None:
    url, key = fuzz_stack.bridge.url, fuzz_stack.keeper_key
    assert fuzz_stack.server.proc.poll() is None and fuzz_stack.bridge.proc.poll() is None
    status, body = _http("POST", url + "/v1/chat/completions", {
        "model": DEFAULT_INT4, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3,
        "temperature": 0}, fuzz_stack.fuzz_key)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    chat_id = fuzz_stack.kept_chat["chat"]["id"]
    status, now = _http("GET", f"{url}/api/chats/{chat_id}", key=key)
    assert status == 200 and now == fuzz_stack.kept_chat
    # The keeper's next turn still works, on top of the untouched history.
    status, _ = _http("POST", f"{url}/api/chats/{chat_id}/messages", {"content": "Another.", "max_tokens": 2}, key)
    assert status == 200
    status, after = _http("GET", f"{url}/api/chats/{chat_id}", key=key)
    assert after["messages"][:3] == now["messages"] and len(after["messages"]) == 5
    for proc in (fuzz_stack.server, fuzz_stack.bridge):
        log = proc.log()
        assert "Traceback" not in log, log[-4000:]
    total = sum(TRIED.values())
    print(f"\nHTTP fuzz: {total} cases over {len({op for op, _, _ in TRIED})} operations")
    for (op, mode, status), n in sorted(TRIED.items()):
        print(f"  {op:45s} {mode:9s} {status}: {n}")
    for op, seconds in SECONDS.most_common(5):
        print(f"  slowest: {op} {seconds:.1f}s")
