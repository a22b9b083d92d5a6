"""A PostgreSQL server of our own, in a folder: Debian's binaries (`make postgres` installs them),
initialised with trust authentication for local connections, listening on 127.0.0.1 only.

`tokenwire cluster` keeps its chats in one (a data folder that lasts); the tests start one in a
temporary folder. As root (containers, CI) it runs as the `postgres` user, since PostgreSQL
refuses to run as root.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

USER = "tokenwire"


class PostgresMissing(RuntimeError):
    """Debian's postgresql package is not installed."""


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise PostgresMissing("PostgreSQL is not installed: `make postgres` installs Debian's postgresql package")
    return Path(found[-1]).parent


class LocalPostgres:
    """initdb (once), start, stop of a server whose data lives in `root`/data."""

    def __init__(self, root: Path, port: int, fsync: bool = True, max_connections: int = 200) -> None:
        self.root, self.port = Path(root), port
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.fsync, self.max_connections = fsync, max_connections
        self.bin = bin_dir()
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._as_user, *cmd], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}\n{tail}")

    def _reachable(self, path: Path) -> bool:
        return subprocess.run([*self._as_user, "test", "-w", str(path)], capture_output=True).returncode == 0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            shutil.chown(self.root, "postgres", "postgres")
            if not self._reachable(self.root):
                # Under a folder the postgres user cannot enter (root's home, say): in its own home,
                # /var/lib/postgresql (Debian's place for it), keyed by the folder asked for.
                key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
                self.root = Path("/var/lib/postgresql/tokenwire") / key
                self.data, self.log = self.root / "data", self.root / "server.log"
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.chown(self.root.parent, "postgres", "postgres")
                shutil.chown(self.root, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                      "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   f"-c max_connections={self.max_connections}" + ("" if self.fsync else " -c fsync=off"))
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60",
                  "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """Creates `name` if it is missing; its URL."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
