"""A chat's KV outlives the server (issue 17, item 2), end to end: a real server writes a turn's KV
behind it, is stopped (SIGTERM), and a new server on the same data folder restores it for the
chat's next turn instead of recomputing the history (the disk tier's hit counter and the usage's
cached prompt tokens say so); deleting the chat deletes its files."""

from __future__ import annotations

import stat
import time
import urllib.request

import grpc
from conftest import DEFAULT_INT4, start_server
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.server.app import open_kv_disk
from tokenwire.server.config import ServerConfig
from tokenwire.server.metrics import PrometheusMetrics
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

SYSTEM = ("You are a careful assistant for a small bakery. You know its opening hours (7 to 15, closed on "
          "Mondays), its breads (rye, spelt, a sourdough loaf on Fridays) and that it takes orders by phone.")
FIRST = "Which breads do you bake, and when is the sourdough ready?"
SECOND = "Can I order two loaves of it by phone for Friday?"


def metrics(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def turn(target: str, chat_id: str, text: str) -> pb.Finished:
    with grpc.insecure_channel(target) as channel:
        request = pb.GenerateRequest(chat_id=chat_id, messages=[pb.ChatMessage(role="user", content=text)],
                                     sampling=pb.SamplingParams(temperature=0), max_tokens=16)
        finished = [r.finished for r in pb_grpc.InferenceStub(channel).Generate(request, timeout=120)
                    if r.HasField("finished")]
    assert len(finished) == 1
    return finished[0]


def wait_for(url: str, key: tuple, value: float, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while (samples := metrics(url)).get(key, 0) < value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {samples.get(key)}"
        time.sleep(0.05)
    return samples


def test_a_restarted_server_restores_the_chats_kv_and_deleting_the_chat_deletes_it(models_dir, tmp_path) -> None:
    db = str(tmp_path / "chats.db")
    model = (("model", DEFAULT_INT4),)
    first = start_server(tmp_path, models_dir, "--database", db)
    try:
        with grpc.insecure_channel(first.target) as channel:
            chat = hpb_grpc.HistoryStub(channel).CreateChat(hpb.CreateChatRequest(system_prompt=SYSTEM), timeout=30)
        one = turn(first.target, chat.id, FIRST)
        assert one.usage.cached_prompt_tokens == 0
        wait_for(first.metrics_url, ("tokenwire_kv_disk_writes_total", (*model, ("result", "written"))), 1)
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.log()
    folder = tmp_path / "kv" / DEFAULT_INT4.replace(":", "_") / chat.id
    [file] = list(folder.iterdir())
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for each in (folder, folder.parent, folder.parent.parent):
        assert stat.S_IMODE(each.stat().st_mode) == 0o700, each

    second = start_server(tmp_path, models_dir, "--database", db)
    try:
        two = turn(second.target, chat.id, SECOND)
        # Restored: the first turn's prompt and reply were not prefilled again.
        assert two.usage.cached_prompt_tokens >= one.usage.prompt_tokens + one.usage.completion_tokens - 2
        assert two.usage.prompt_tokens > two.usage.cached_prompt_tokens > 60
        samples = wait_for(second.metrics_url, ("tokenwire_kv_disk_writes_total", (*model, ("result", "written"))), 1)
        assert samples[("tokenwire_kv_disk_lookups_total", (*model, ("result", "hit")))] == 1
        assert samples[("tokenwire_kv_disk_reused_tokens_total", model)] == two.usage.cached_prompt_tokens
        assert samples.get(("tokenwire_prefix_cache_lookups_total", (*model, ("result", "hit"))), 0) == 0, \
            "the memory cache was empty after the restart: the reuse came from disk"
        assert [p.name for p in folder.iterdir()] != [file.name], "the second turn's KV replaced the first's"

        with grpc.insecure_channel(second.target) as channel:
            hpb_grpc.HistoryStub(channel).DeleteChat(hpb.DeleteChatRequest(chat_id=chat.id), timeout=30)
        assert not folder.exists(), "a deleted chat's KV files go with it"
        assert metrics(second.metrics_url)[("tokenwire_kv_disk_files", ())] == 0
    finally:
        second.stop()


def test_stateless_requests_write_nothing(server) -> None:
    """The session server (its data folder beside its tmp database): a prompt without a chat keeps no
    KV and looks none up (a turn's write is queued before its stream ends, and takes milliseconds)."""
    before = metrics(server.metrics_url)
    with grpc.insecure_channel(server.target) as channel:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=FIRST)], max_tokens=4,
                                     sampling=pb.SamplingParams(temperature=0))
        list(pb_grpc.InferenceStub(channel).Generate(request, timeout=120))
    time.sleep(0.5)
    after = metrics(server.metrics_url)
    key = ("tokenwire_kv_disk_writes_total", (("model", DEFAULT_INT4), ("result", "written")))
    assert after.get(key, 0) == before.get(key, 0)
    assert after.get(("tokenwire_kv_disk_lookups_total", (("model", DEFAULT_INT4), ("result", "miss"))), 0) == \
        before.get(("tokenwire_kv_disk_lookups_total", (("model", DEFAULT_INT4), ("result", "miss"))), 0)


def test_the_kv_folder_sits_beside_the_database_and_one_that_cannot_be_made_turns_the_tier_off(
        tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert ServerConfig(database=str(tmp_path / "chats.db")).kv_root == tmp_path / "kv"
    assert ServerConfig(database="postgresql://u@db/x").kv_root == tmp_path / "data" / "tokenwire" / "kv"
    assert ServerConfig(kv_dir=str(tmp_path / "mine")).kv_root == tmp_path / "mine"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert open_kv_disk(ServerConfig(kv_dir=str(blocked / "kv")), PrometheusMetrics()) is None
    assert "cannot use" in caplog.text and "--kv-dir" in caplog.text
    assert open_kv_disk(ServerConfig(kv_dir=str(tmp_path / "kv"), kv_disk_budget_bytes=0), PrometheusMetrics()) is None
    assert not (tmp_path / "kv").exists()
