"""llama.cpp through llama-cpp-python, in the peers venv: greedy generation from token ids.

    .venv-peers/bin/python bench/peers/drive_llama.py MODEL.gguf [--threads 2] [--ctx 2048]

Speaks the line protocol of protocol.py. No prompt reuse between requests: each one starts
from an empty KV cache (reset), so time to first token is a full prefill.
"""

from __future__ import annotations

import argparse

import llama_cpp
from protocol import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_ctx=args.ctx, verbose=False)

    def generate(ids: list[int], max_new: int):
        llm.reset()  # forget the previous request: no prefix reuse
        # generate() does not stop at end-of-sequence; temp 0 is greedy.
        yield from llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

    serve({"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "n_threads": args.threads,
           "n_threads_batch": llm.n_threads_batch, "n_ctx": args.ctx, "n_batch": llm.n_batch}, generate)


if __name__ == "__main__":
    main()
