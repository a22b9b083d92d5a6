"""onnxruntime-genai through its Python API, in the peers venv: greedy generation from token ids.

    .venv-peers/bin/python bench/peers/drive_genai.py MODEL_DIR

Speaks the line protocol of protocol.py. A fresh generator per request, with max_length set to
prompt + new tokens (genai allocates its shared KV buffer at max_length, and a smaller buffer
decodes faster) and min_length equal to it, so it never stops early at end-of-sequence.
"""

from __future__ import annotations

import argparse

import onnxruntime_genai as og
from protocol import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    args = parser.parse_args()
    model = og.Model(args.model_dir)

    def generate(ids: list[int], max_new: int):
        params = og.GeneratorParams(model)
        length = len(ids) + max_new
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # prefill
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    serve({"engine": "onnxruntime-genai", "onnxruntime_genai": og.__version__, "max_length": "prompt + new tokens"},
          generate)


if __name__ == "__main__":
    main()
