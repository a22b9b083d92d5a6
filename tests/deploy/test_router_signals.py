"""What a router reads from a replica, without a cluster: the metrics listener's /readyz (200 while
the server takes calls, 503 while starting or draining; no scrape token needed), the totals named
as the Gateway API inference extension asks, the affinity keys, and the HAProxy configuration
(checked by haproxy itself)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

from conftest import free_port

from tokenwire import affinity
from tokenwire.clients.haproxy_config import Replica, render
from tokenwire.server.metrics import PrometheusMetrics
from tokenwire.v1 import inference_pb2 as pb


def fetch(url: str, token: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readiness_and_the_totals_a_router_reads() -> None:
    metrics, port = PrometheusMetrics(), free_port()
    assert metrics.serve_http("127.0.0.1", port, token="s3cret")
    base = f"http://127.0.0.1:{port}"
    assert fetch(base + "/readyz") == (503, "not ready: starting or draining\n")
    metrics.ready = True
    assert fetch(base + "/readyz") == (200, "ready\n")
    assert fetch(base + "/metrics")[0] == 401, "the metrics themselves still need the token"

    metrics.capacity("a", 16, 1000)
    metrics.capacity("b", 4, 3000)
    metrics.queue_length("a", 3)
    metrics.queue_length("b", 2)
    metrics.batch_size("a", 4)
    metrics.batch_size("b", 1)
    metrics.prefix_cache_state("a", 2, 500, 0)
    metrics.prefix_cache_state("b", 1, 1500, 0)
    text = fetch(base + "/metrics", "s3cret")[1]
    for line in ("tokenwire:num_requests_waiting 5.0", "tokenwire:num_requests_running 5.0",
                 "tokenwire:kv_cache_usage_perc 0.25", "tokenwire:prefix_cache_usage_perc 0.5"):
        assert line + "\n" in text, line
    metrics.capacity("b", 0, 0)  # b unloaded: its scheduler stopped and reported zeros
    metrics.queue_length("b", 0)
    metrics.batch_size("b", 0)
    text = fetch(base + "/metrics", "s3cret")[1]
    assert "tokenwire:kv_cache_usage_perc 0.25\n" in text and "tokenwire:num_requests_waiting 3.0\n" in text


def test_affinity_keys_follow_the_conversation() -> None:
    first = [("system", "Be brief."), ("user", "Hi")]
    later = [*first, ("assistant", "Hello!"), ("user", "How are you?")]
    assert affinity.for_messages(first) == affinity.for_messages(later), "a conversation keeps its key"
    assert affinity.for_messages([("system", "Be brief."), ("user", "Bye")]) != affinity.for_messages(first)
    assert affinity.for_messages([("system", "only a system prompt")]) == ""
    assert affinity.for_request(pb.GenerateRequest(chat_id="ab12")) == "chat-ab12"
    shared = "x" * affinity.PROMPT_BYTES
    assert affinity.for_prompt(shared + "one") == affinity.for_prompt(shared + "two") != affinity.for_prompt("other")
    assert affinity.for_request(pb.GenerateRequest()) == ""
    assert affinity.for_chat("\x84") == "", "an id no chat has gets no key (it must not break the call's metadata)"
    # The CLI's calls on a chat's reply reach the server that writes it, as its Generate calls do.
    from tokenwire.clients.connection import _affinity_of
    from tokenwire.v1 import history_pb2 as hpb

    assert _affinity_of(hpb.WatchReplyRequest(chat_id="ab12", message_id=3)) == "chat-ab12"
    assert _affinity_of(hpb.StopReplyRequest(chat_id="ab12", message_id=3)) == "chat-ab12"
    assert _affinity_of(hpb.GetChatRequest(chat_id="ab12")) == ""
    assert affinity.valid("chat-ab12") and not affinity.valid("") and not affinity.valid("é") \
        and not affinity.valid("x" * 129)


def test_the_router_configuration_is_valid_haproxy(tmp_path) -> None:
    assert shutil.which("haproxy"), "HAProxy is not installed: `make test` installs it (make haproxy)"
    config = render([Replica("r1", 1001, 1002, 1003), Replica("r2", 2001, 2002, 2003)], 8080, 50050, 8404)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "balance hdr(x-tokenwire-affinity)\n    hash-type consistent" in config
    assert "server r2 127.0.0.1:2001 proto h2 check port 2002 check-proto h1" in config
