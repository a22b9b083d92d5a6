"""A long chat's first turn after a restart: time to first token against a warm turn's (issue 17).

Five chats of about 1,500 tokens of history each (a system prompt and six exchanges, appended to
the store), on one database and one data folder:

1. a server answers one turn of each chat (its KV goes to memory and, behind it, to disk), then a
   second turn: the *warm* turn, reusing the memory cache;
2. that server stops; a new one starts, the model is loaded by a request on another chat, and each
   chat's next turn is timed: *after a restart*, restored from the disk tier;
3. the same again with the disk tier off (`--kv-disk-budget-bytes 0`): *after a restart,
   recomputed*, what every restart cost before the tier.

Time to first token as the client sees it (gRPC, the chat store's commit included), medians of the
five chats; the server's own figure and the prompt tokens reused are beside it. Target: restored
<= 2x warm. Last, the time to read and check one chat's KV file (what a restore adds) on its own.

    .venv/bin/python bench/bench_long_chat.py [--chats 5] [--history 1500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median, running_server, table, write_json  # noqa: E402

from tokenwire.server.build.quality import eval_text  # noqa: E402
from tokenwire.server.engine.kv_file import read_arrays, read_header  # noqa: E402
from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore  # noqa: E402
from tokenwire.v1 import history_pb2 as hpb  # noqa: E402
from tokenwire.v1 import history_pb2_grpc as hpb_grpc  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m:int4"
SYSTEM = "You are a well-read assistant. Answer questions about the passages the user quotes."
EXCHANGES = 6
QUESTIONS = ["Summarise that in one sentence.", "What is the main point?", "Say it more simply."]


def history(tokenizer: TokenizerBundle, chat: int, tokens: int) -> list[tuple[str, str]]:
    """(role, text) pairs: quoted passages and answers, about `tokens` tokens in all; each chat its own."""
    ids = tokenizer.encode(eval_text())
    per = tokens // (2 * EXCHANGES)
    start = chat * 97 % max(1, len(ids) - 2 * EXCHANGES * per)
    pieces = [tokenizer.decode(ids[start + i * per: start + (i + 1) * per]) for i in range(2 * EXCHANGES)]
    return [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(pieces)]


def make_chat(target: str, messages: list[tuple[str, str]]) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = hpb_grpc.HistoryStub(channel)
        chat = stub.CreateChat(hpb.CreateChatRequest(title="long chat", model=MODEL, system_prompt=SYSTEM),
                               timeout=30)
        for role, text in messages:
            stub.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role=role, content=text), timeout=30)
    return chat.id


def turn(target: str, chat_id: str, text: str) -> dict:
    """One turn of the chat: client-side TTFT (ms), the server's, prompt and reused tokens."""
    request = pb.GenerateRequest(chat_id=chat_id, messages=[pb.ChatMessage(role="user", content=text)],
                                 max_tokens=8, sampling=pb.SamplingParams(temperature=0.0))
    with grpc.insecure_channel(target) as channel:
        started = time.perf_counter()
        ttft, usage = 0.0, None
        for response in pb_grpc.InferenceStub(channel).Generate(request, timeout=600):
            if response.HasField("token") and not ttft:
                ttft = (time.perf_counter() - started) * 1000
            elif response.HasField("finished"):
                usage = response.finished.usage
    return {"ttft_ms": ttft, "server_ttft_ms": usage.time_to_first_token_ms, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_prompt_tokens}


def load_model(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(model=MODEL, prompt="Hello", max_tokens=2),
                                                     timeout=600))


def read_back(path: Path) -> tuple[float, float]:
    """(ms, MB) to read one KV file's header and arrays and check its digest, as a restore does."""
    started = time.perf_counter()
    arrays = read_arrays(read_header(path))
    return (time.perf_counter() - started) * 1000, sum(a.nbytes for a in arrays) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--history", type=int, default=1500, help="tokens of history per chat")
    args = parser.parse_args()
    tokenizer = TokenizerBundle(ModelStore().get(MODEL).path)
    results: dict[str, list[dict]] = {"warm": [], "after a restart, restored from disk": [],
                                      "after a restart, recomputed (disk tier off)": []}
    with tempfile.TemporaryDirectory(prefix="bench-long-chat-") as tmp:
        base = ("--database", str(Path(tmp) / "chats.db"), "--metrics-port", "0")
        with running_server(*base) as target:
            chats = [make_chat(target, history(tokenizer, i, args.history)) for i in range(args.chats)]
            load_model(target)
            for chat in chats:
                turn(target, chat, QUESTIONS[0])  # its KV goes to memory and to disk
                results["warm"].append(turn(target, chat, QUESTIONS[1]))
        for label, extra in (("after a restart, restored from disk", ()),
                             ("after a restart, recomputed (disk tier off)", ("--kv-disk-budget-bytes", "0"))):
            with running_server(*base, *extra) as target:
                load_model(target)  # the model already loaded, as the target says
                for chat in chats:
                    results[label].append(turn(target, chat, QUESTIONS[2]))
        loads = [read_back(path) for path in sorted((Path(tmp) / "kv").rglob("*.kv"))]
    warm = median([r["ttft_ms"] for r in results["warm"]])
    rows = [[label, median([r["ttft_ms"] for r in runs]), median([r["server_ttft_ms"] for r in runs]),
             median([r["prompt_tokens"] for r in runs]), median([r["cached_tokens"] for r in runs]),
             median([r["ttft_ms"] for r in runs]) / warm] for label, runs in results.items()]
    print(f"\nA chat's next turn ({MODEL}, about {args.history} tokens of history, medians of {args.chats} chats):")
    print(table(["turn", "TTFT ms", "server TTFT ms", "prompt tokens", "reused tokens", "x warm"], rows))
    restored = rows[1][5]
    load_ms, load_mb = median([ms for ms, _ in loads]), median([mb for _, mb in loads])
    print(f"\nrestored after a restart: {restored:.2f}x a warm turn (target <= 2x); reading and checking one "
          f"chat's KV file ({load_mb:.1f} MB, page cache warm): {load_ms:.1f} ms, median of {len(loads)}")
    path = write_json("long_chat.json", {"model": MODEL, "history_tokens": args.history, "chats": args.chats,
                                         "restored_vs_warm": restored, "recomputed_vs_warm": rows[2][5],
                                         "file_read_ms": load_ms, "file_mb": load_mb, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
