"""A real PostgreSQL server for the tests (a pytest plugin; tests/conftest.py loads it).

`postgres_server` (session): Debian's PostgreSQL (`make test` installs it) initialised into a
temporary folder with trust authentication, listening on 127.0.0.1 on a free port, stopped at the
end (tokenwire.clients.local_postgres, which `tokenwire cluster` uses too). `pg_url` (per test): a
fresh, empty database on it, as a URL for `--database` / ChatStore.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tokenwire.clients.local_postgres import LocalPostgres, PostgresMissing


@dataclass
class PostgresServer:
    server: LocalPostgres
    _count: int = field(default=0)

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, database: str) -> str:
        return self.server.url(database)

    def new_database(self) -> str:
        self._count += 1
        return self.server.create_database(f"chats_{os.getpid()}_{self._count}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="tokenwire-pg-"))
    try:
        server = LocalPostgres(root, _free_port(), fsync=False)
    except PostgresMissing as exc:
        pytest.fail(f"{exc} (`make test` does)")
    server.start()
    try:
        yield PostgresServer(server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()
