"""Pulling a model on the server's behalf (the PullModel RPC, Ollama's /api/pull): `tokenwire pull
NAME` run as a child process, its output relayed line by line.

A child process, because a pull is the build path (server/build/, torch for some models) that the
serving process never imports, and because a pull can take minutes: the child can be stopped
outright when the caller goes away, and a failure of the build cannot touch the server.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

# The names `tokenwire pull` takes: a catalogue name or an id, never an option.
PULL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
TAIL_LINES = 12


class PullFailed(RuntimeError):
    """The pull did not succeed; the message holds the end of its output."""


class InvalidPullName(ValueError):
    pass


async def pull_lines(name: str, store_root: Path, force: bool = False) -> AsyncIterator[str]:
    """Yields each line `tokenwire pull` prints; raises PullFailed when it fails. Stopping the
    iteration early (the caller went away) kills the child."""
    if not PULL_NAME.fullmatch(name):
        raise InvalidPullName(f"{name[:80]!r} is not a model name (letters, digits, '.', '_', ':' and '-')")
    args = [sys.executable, "-m", "tokenwire.clients.cli", "pull", name, "--models-dir", str(store_root)]
    if force:
        args.append("--force")
    child = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    tail: list[str] = []
    try:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                tail = (tail + [text])[-TAIL_LINES:]
                yield text
        code = await child.wait()
        if code != 0:
            raise PullFailed(f"tokenwire pull {name} failed (exit {code}): " + " | ".join(tail[-4:]))
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
