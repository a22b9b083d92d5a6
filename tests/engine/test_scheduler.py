"""Continuous batching, admission, fairness, cancellation and prefix reuse, on the real model."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import DEFAULT_INT4, start_server
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.graph import is_fast_graph
from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    QueuedEvent,
    Sequence,
    TokenEvent,
)
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

PROMPTS = [
    "The capital of France is",
    "Write a poem about autumn leaves falling in a quiet park at dusk.",
    "def quicksort(arr):",
    "List three fruits:",
    "Once upon a time there was a dragon who",
    "The theory of relativity says that",
    "Q: What is 2 + 2?\nA:",
    "In the beginning",
]


class EngineFactory:
    """A fresh engine of the default model for each scheduler (each owns its KV buffers)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fast = is_fast_graph(folder)

    def __call__(self):
        return FastEngine(self.folder, context_length=4096) if self.fast else OptimumEngine(self.folder / "model.onnx")


@pytest.fixture(scope="module")
def model(int4_dir: Path):
    return EngineFactory(int4_dir), TokenizerBundle(int4_dir)


def greedy_request(tok: TokenizerBundle, prompt: str, max_tokens: int = 24, user: str = "",
                   ignore_eos: bool = False) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tok.encode(prompt), max_tokens=max_tokens,
                             sampling=SamplingConfig(temperature=0.0), user=user, ignore_eos=ignore_eos)


async def alone(engines, tok, prompt: str, max_tokens: int = 24) -> list[int]:
    """Greedy tokens of a prompt run on its own (a batch of one)."""
    scheduler = Scheduler(engines(), SchedulerConfig(max_batch=1, prefix_cache_bytes=0, prefill_chunk=16))
    try:
        return (await consume(submit(scheduler, tok, greedy_request(tok, prompt, max_tokens))))[0]
    finally:
        scheduler.stop()


async def consume(handle: SequenceHandle, log: list | None = None) -> tuple[list[int], FinishedEvent, list]:
    tokens, queued = [], []
    async for event in handle.events():
        if log is not None:
            log.append((handle, event, time.perf_counter()))
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, QueuedEvent):
            queued.append(event.position)
        elif isinstance(event, FinishedEvent):
            return tokens, event, queued
    raise AssertionError("stream ended without a finished event")


def submit(scheduler: Scheduler, tok, request: GenerationRequest) -> SequenceHandle:
    handle = SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    return handle


async def test_greedy_output_does_not_depend_on_the_batch(model) -> None:
    decoder, tok = model
    reference = await alone(decoder, tok, PROMPTS[0])
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=8, prefix_cache_bytes=0, prefill_chunk=16))
    try:
        # Stagger arrivals so sequences join a running batch at different lengths.
        handles = []
        for i, prompt in enumerate(PROMPTS):
            handles.append(submit(scheduler, tok, greedy_request(tok, prompt, 24 + 3 * i)))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*(consume(h) for h in handles))
        assert results[0][0] == reference, "the same prompt gave other tokens when batched with 7 others"
        for prompt, (tokens, _, _) in zip(PROMPTS[1:4], results[1:4], strict=True):
            assert tokens == await alone(decoder, tok, prompt, len(tokens)), prompt
        assert scheduler.stats.batch_size_sum / scheduler.stats.steps > 2, "sequences should have shared steps"
    finally:
        scheduler.stop()


async def test_bounded_queue_refuses_at_once_and_reports_positions(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=1, queue_size=3, prefix_cache_bytes=0))
    try:
        running = submit(scheduler, tok, greedy_request(tok, "Count to fifty:", 40, ignore_eos=True))
        await asyncio.sleep(0.2)
        waiting = [submit(scheduler, tok, greedy_request(tok, p, 2, ignore_eos=True)) for p in PROMPTS[:3]]
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="busy"):
            submit(scheduler, tok, greedy_request(tok, "one too many", 2))
        assert time.perf_counter() - started < 0.1
        results = await asyncio.gather(consume(running), *(consume(h) for h in waiting))
        assert [r[2][0] for r in results[1:]] == [1, 2, 3], "each waiting request is told its place"
        assert results[3][2] == [3, 2, 1], "and told again as it moves up"
        assert all(r[1].reason == FinishReason.LENGTH for r in results)
    finally:
        scheduler.stop()


async def test_fair_turns_across_users(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=2, queue_size=32, prefix_cache_bytes=0))
    try:
        flood = [submit(scheduler, tok, greedy_request(tok, f"Story number {i}:", 6, user="A", ignore_eos=True)) for i in range(10)]
        await asyncio.sleep(0.05)
        single = submit(scheduler, tok, greedy_request(tok, "Hello, I am B and", 6, user="B", ignore_eos=True))
        log: list = []
        await asyncio.gather(*(consume(h, log) for h in flood + [single]))
        first_token_at = {}
        for handle, event, at in log:
            if isinstance(event, TokenEvent):
                first_token_at.setdefault(handle, at)
        order = sorted(first_token_at, key=first_token_at.get)
        assert order.index(single) < order.index(flood[9]), "B's one request must not wait behind all of A's"
        assert order.index(single) <= 3
    finally:
        scheduler.stop()


async def test_per_user_stream_limit(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=4, max_streams_per_user=1, prefix_cache_bytes=0))
    try:
        handles = [submit(scheduler, tok, greedy_request(tok, f"Item {i}:", 8, user="A", ignore_eos=True)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert scheduler.running <= 1
        results = await asyncio.gather(*(consume(h) for h in handles))
        assert all(r[1].usage.completion_tokens == 8 for r in results)
        assert scheduler.stats.batch_size_sum == scheduler.stats.steps, "user A never had two streams at once"
    finally:
        scheduler.stop()


async def test_cancelled_sequence_frees_its_slot_within_a_step(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=1, queue_size=4, prefix_cache_bytes=0))
    try:
        long = submit(scheduler, tok, greedy_request(tok, "Write a very long story:", 2000, ignore_eos=True))
        waiting = submit(scheduler, tok, greedy_request(tok, "Hi", 3, ignore_eos=True))
        got = 0
        async for event in long.events():
            if isinstance(event, TokenEvent):
                got += 1
                if got == 3:
                    steps_at_cancel = scheduler.stats.steps
                    long.cancel()
            if isinstance(event, FinishedEvent):
                assert event.reason == FinishReason.CANCELLED
                break
        tokens, finished, _ = await consume(waiting)
        assert finished.reason == FinishReason.LENGTH
        assert finished.usage.completion_tokens == 3
        # The waiting request started within a step or two of the cancel, not after 2000 tokens.
        assert scheduler.stats.steps - steps_at_cancel <= 2 + 3
    finally:
        scheduler.stop()


async def test_prefix_reuse_gives_the_cold_tokens(model) -> None:
    decoder, tok = model
    history = tok.render_chat([{"role": "user", "content": "My name is Ada. Remember it."}])
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=4, prefix_cache_bytes=64 << 20))
    try:
        first, finished, _ = await consume(submit(scheduler, tok, GenerationRequest(
            prompt_ids=tok.encode(history), max_tokens=20, sampling=SamplingConfig(temperature=0.0))))
        turn2 = tok.render_chat([
            {"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": tok.decode(first)},
            {"role": "user", "content": "What is my name?"},
        ])
        request = GenerationRequest(prompt_ids=tok.encode(turn2), max_tokens=16, sampling=SamplingConfig(temperature=0.0))
        warm, warm_finished, _ = await consume(submit(scheduler, tok, request))
        assert warm_finished.usage.cached_prompt_tokens > len(tok.encode(history)) - 1
        assert scheduler.prefix_cache.stats.hits >= 1
        cold = await alone(decoder, tok, turn2, 16)
        assert warm == cold[: len(warm)] and len(warm) == len(cold)
    finally:
        scheduler.stop()


def test_queue_full_over_grpc_is_resource_exhausted_at_once(models_dir, tmp_path) -> None:
    server = start_server(tmp_path, models_dir, "--max-batch", "1", "--queue-size", "1")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            list(stub.Generate(pb.GenerateRequest(prompt="warm", max_tokens=1), timeout=60))
            long = stub.Generate(pb.GenerateRequest(prompt="A long story:", max_tokens=500, ignore_eos=True), timeout=120)
            assert next(long).WhichOneof("event") == "started"
            assert next(long).WhichOneof("event") == "token"  # it holds the one slot
            queued = stub.Generate(pb.GenerateRequest(prompt="Wait", max_tokens=2, ignore_eos=True), timeout=120)
            assert next(queued).WhichOneof("event") == "started"
            first = next(queued)
            assert first.WhichOneof("event") == "queued" and first.queued.position == 1
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(prompt="Refused", max_tokens=2), timeout=60))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - started < 1.0
            assert ("retry-after", "1") in (info.value.trailing_metadata() or ())
            long.cancel()
            events = [r.WhichOneof("event") for r in queued]
            assert events[-1] == "finished" and events.count("token") == 2
    finally:
        server.stop()


def test_deadline_ends_generation(stub, server) -> None:
    list(stub.Generate(pb.GenerateRequest(prompt="warm up", max_tokens=1), timeout=60))  # load the model first
    request_id = f"deadline-{time.monotonic_ns()}"
    call = stub.Generate(pb.GenerateRequest(prompt="Tell me everything.", max_tokens=3000, ignore_eos=True,
                                            request_id=request_id), timeout=1.5)
    received = 0
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            received += response.WhichOneof("event") == "token"
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received > 0, "the generation had started when its deadline passed"
    # The server logs how each request ended, by its id: this one was cancelled, not run to 3000.
    pattern = re.compile(rf"request {re.escape(request_id)} .*generated=(\d+) .*finish=(\w+)")
    deadline = time.monotonic() + 10
    while not (match := pattern.search(server.log())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert match, f"the server should end a generation whose deadline passed (no ending for {request_id})"
    assert match.group(2) == "cancelled", match.group(0)
    assert received <= int(match.group(1)) < 3000, match.group(0)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus endpoint: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(url: str, done, timeout: float = 10) -> dict:
    """Scrapes until done(samples) holds (counters are bumped just after the finished event is sent)."""
    deadline = time.monotonic() + timeout
    while not done(samples := scrape(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


COUNTERS = {  # what one request adds to the server's counters, by name here
    "tokens": ("tokenwire_tokens_generated_total", {}),
    "finished length": ("tokenwire_requests_total", {"finish_reason": "length"}),
    "finished stop": ("tokenwire_requests_total", {"finish_reason": "stop"}),
    "first tokens": ("tokenwire_time_to_first_token_seconds_count", {}),
    "token gaps": ("tokenwire_inter_token_latency_seconds_count", {}),
    "prefix hits": ("tokenwire_prefix_cache_lookups_total", {"result": "hit"}),
    "prefix misses": ("tokenwire_prefix_cache_lookups_total", {"result": "miss"}),
    "reused tokens": ("tokenwire_prefix_cache_reused_tokens_total", {}),
}


def counter_deltas(after: dict, before: dict, model: str) -> dict[str, float]:
    return {key: sample(after, name, model=model, **labels) - sample(before, name, model=model, **labels)
            for key, (name, labels) in COUNTERS.items()}


def test_server_metrics_in_prometheus_format(stub, server) -> None:
    model = {"model": DEFAULT_INT4}

    def idle(s: dict) -> bool:
        return sample(s, "tokenwire_batch_size", **model) == 0 and sample(s, "tokenwire_queue_length", **model) == 0

    def generate() -> pb.Finished:
        request = pb.GenerateRequest(prompt="Metrics please: count the tokens of this request, then of its twin.",
                                     max_tokens=5, ignore_eos=True, model=DEFAULT_INT4)
        return [r.finished for r in stub.Generate(request, timeout=60) if r.HasField("finished")][0]

    def counted(before: dict):
        return lambda s: counter_deltas(s, before, DEFAULT_INT4)["tokens"] >= 5

    before = scrape_until(server.metrics_url, idle)  # earlier tests' generations have ended
    assert idle(before)
    first = generate()
    middle = scrape_until(server.metrics_url, counted(before))
    second = generate()  # the same prompt again: its prefix is reused
    after = scrape_until(server.metrics_url, counted(middle))
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for name in ("tokenwire_queue_length", "tokenwire_batch_size", "tokenwire_time_to_first_token_seconds_bucket",
                 "tokenwire_inter_token_latency_seconds_bucket", "tokenwire_tokens_generated_total",
                 "tokenwire_requests_total", "tokenwire_prefix_cache_lookups_total", "tokenwire_model_load_seconds_count"):
        assert name in text, name
    # Each request adds exactly its own tokens, its ending, its one prefix lookup and what it reused.
    assert first.usage.completion_tokens == second.usage.completion_tokens == 5
    assert second.usage.cached_prompt_tokens == second.usage.prompt_tokens - 1 > 8
    one_request = {"tokens": 5, "finished length": 1, "finished stop": 0, "first tokens": 1, "token gaps": 4}
    missed = first.usage.cached_prompt_tokens == 0
    assert counter_deltas(middle, before, DEFAULT_INT4) == {
        **one_request, "prefix hits": int(not missed), "prefix misses": int(missed),
        "reused tokens": first.usage.cached_prompt_tokens}
    assert counter_deltas(after, middle, DEFAULT_INT4) == {
        **one_request, "prefix hits": 1, "prefix misses": 0, "reused tokens": second.usage.cached_prompt_tokens}


async def test_queue_bound_holds_while_the_batch_is_not_full(model) -> None:
    """Admission happens between steps; a long prefill must not let the queue grow without bound."""
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=4, queue_size=2, prefix_cache_bytes=0, prefill_chunk=64))
    try:
        long_prompt = " ".join(["word"] * 1500)
        accepted, refused = [submit(scheduler, tok, greedy_request(tok, long_prompt, 2))], 0
        for i in range(20):
            try:
                accepted.append(submit(scheduler, tok, greedy_request(tok, f"Short {i}", 2)))
            except QueueFull:
                refused += 1
        assert len(accepted) <= 4 + 2 + 1 and refused >= 13
        results = await asyncio.gather(*(consume(h) for h in accepted))
        assert all(r[1].reason in (FinishReason.LENGTH, FinishReason.STOP) for r in results)
    finally:
        scheduler.stop()


async def test_one_sequence_failing_ends_only_that_sequence(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=4, prefix_cache_bytes=0))
    try:
        healthy = submit(scheduler, tok, greedy_request(tok, "Count: one, two,", 24, ignore_eos=True))
        broken_request = greedy_request(tok, "This one breaks", 24, ignore_eos=True)
        broken_sequence = Sequence(broken_request, tok)
        real_step, calls = broken_sequence.step, []

        def failing_step(logits):  # fault injection: this sequence's sampling fails at its third token
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real_step(logits)

        broken_sequence.step = failing_step
        broken = SequenceHandle(broken_sequence, asyncio.get_running_loop())
        scheduler.submit(broken)
        (ok_tokens, ok_finished, _), (bad_tokens, bad_finished, _) = await asyncio.gather(consume(healthy),
                                                                                          consume(broken))
        assert bad_finished.reason == FinishReason.ERROR and "injected failure" in bad_finished.error_message
        assert len(bad_tokens) == 2
        assert ok_finished.reason == FinishReason.LENGTH and len(ok_tokens) == 24
        # The scheduler goes on serving.
        tokens, finished, _ = await consume(submit(scheduler, tok, greedy_request(tok, "Still alive?", 3, ignore_eos=True)))
        assert finished.reason == FinishReason.LENGTH and len(tokens) == 3
    finally:
        scheduler.stop()


@pytest.mark.parametrize("kernels", ["auto", "onnxruntime"])  # paged pool (native), dense rows
def test_fast_engine_gives_memory_back(int4_dir: Path, kernels: str) -> None:
    engine = FastEngine(int4_dir, context_length=8192, kernels=kernels)
    small = engine.kv_bytes
    state = engine.new_prefill()
    engine.prefill(state, [5] * 1400)
    engine.join(state)
    engine.step([5])
    grown = engine.kv_bytes
    assert grown >= engine.kv_bytes_for(1401) > small
    engine.remove([0])
    assert engine.kv_bytes <= small, "buffers sized for a 1,400-token sequence must be released"


async def test_cancel_while_waiting_for_prefill_frees_the_slot_at_once(model) -> None:
    decoder, tok = model
    scheduler = Scheduler(decoder(), SchedulerConfig(max_batch=2, queue_size=4, prefix_cache_bytes=0, prefill_chunk=32))
    try:
        long = submit(scheduler, tok, greedy_request(tok, " ".join(["word"] * 1500), 2, ignore_eos=True))
        behind = submit(scheduler, tok, greedy_request(tok, "Behind the long one", 2, ignore_eos=True))
        log: list = []
        long_task = asyncio.ensure_future(consume(long, log))
        await asyncio.sleep(0.3)
        behind.cancel()
        _, finished, _ = await consume(behind, log)
        assert finished.reason == FinishReason.CANCELLED
        first_long_token = [at for h, e, at in log if h is long and isinstance(e, TokenEvent)]
        assert not first_long_token, "the cancelled request waited for the long prefill to end"
        assert scheduler.running <= 1
        await long_task
    finally:
        scheduler.stop()
