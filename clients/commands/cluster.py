"""`tokenwire cluster`: a local deployment of real processes behind a real router.

PostgreSQL (a data folder of its own, so the chats outlive the cluster), N server replicas (each
`tokenwire serve` with its own models and scheduler, threads split so they do not oversubscribe
the cores), one bridge per replica, and HAProxy in front (see clients/haproxy_config.py), with the
front doors on --host:--http-port (HTTP: the page, SSE, OpenAI, chats) and --host:--grpc-port
(gRPC). A server replica that dies is started again after a second and rejoins once its health
check passes (as Kubernetes would restart it). Ctrl-C or SIGTERM stops everything: the front
door first, then the servers drain (their replies are stored), then the bridges and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.clients.haproxy_config import Replica, render
from tokenwire.clients.local_postgres import LocalPostgres, PostgresMissing

RESTART_AFTER_S = 1.0
MAX_RESTARTS = 5  # per replica: one that keeps dying is left down (its log says why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_folder() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "tokenwire" / "cluster"


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    died_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child holds it for its life
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env})
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, wait_s: float, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_http(url: str, timeout_s: float, child: Child) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def cmd_cluster(args: argparse.Namespace) -> int:
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else "")
    if not haproxy:
        print("tokenwire cluster: HAProxy is not installed (`make cluster` installs Debian's haproxy)", file=sys.stderr)
        return 1
    folder = Path(args.folder).expanduser()
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "tokenwire.clients.cli"]
    replicas_n = max(1, args.replicas)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // replicas_n)
    children: list[Child] = []
    postgres: LocalPostgres | None = None
    stopping: list[int] = []

    def on_signal(signum: int, frame) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        database = args.database
        if not database:
            try:
                postgres = LocalPostgres(folder / "postgres", args.postgres_port or _free_port())
            except PostgresMissing as exc:
                print(f"tokenwire cluster: {exc}", file=sys.stderr)
                return 1
            postgres.start()
            database = postgres.create_database("tokenwire")
        replicas = [Replica(f"r{i + 1}", _free_port(), _free_port(), _free_port()) for i in range(replicas_n)]
        servers = [Child(f"server {r.name}", exe + [
            "serve", "--host", "127.0.0.1", "--port", str(r.grpc_port), "--metrics-port", str(r.ready_port),
            "--database", database, "--threads", str(threads), *serve_args], logs / f"server-{r.name}.log")
            for r in replicas]
        for child in servers:
            child.start()
            children.append(child)
        for child, r in zip(servers, replicas, strict=True):
            if not _wait_http(f"http://127.0.0.1:{r.ready_port}/readyz", 120, child):
                print(f"tokenwire cluster: {child.name} did not start; see {child.log}", file=sys.stderr)
                return 1
        config = folder / "haproxy.cfg"
        config.write_text(render(replicas, args.http_port, args.grpc_port, args.stats_port, args.host))
        router = Child("router", [haproxy, "-db", "-f", str(config)], logs / "haproxy.log")
        router.start()
        children.append(router)
        bridges = [Child(f"bridge {r.name}", exe + [
            "bridge", "--server", f"127.0.0.1:{args.grpc_port}", "--http-host", "127.0.0.1",
            "--http-port", str(r.http_port), "--ollama-port", "0",
            "--server-metrics-url", f"http://127.0.0.1:{r.ready_port}/metrics"], logs / f"bridge-{r.name}.log")
            for r in replicas]
        for child in bridges:
            child.start()
            children.append(child)
        for child, r in zip(bridges, replicas, strict=True):
            if not _wait_http(f"http://127.0.0.1:{r.http_port}/readyz", 60, child):
                print(f"tokenwire cluster: {child.name} did not start; see {child.log}", file=sys.stderr)
                return 1
        if not _wait_http(f"http://{args.host}:{args.http_port}/readyz", 30, router):
            print(f"tokenwire cluster: the router did not start; see {router.log}", file=sys.stderr)
            return 1
        state = folder / "cluster.json"

        def write_state() -> None:
            state.write_text(json.dumps({
                "router_pid": router.proc.pid, "postgres_folder": str(postgres.root) if postgres else None,
                "replicas": [
                {"name": r.name, "grpc_port": r.grpc_port, "ready_port": r.ready_port, "http_port": r.http_port,
                 "server_pid": s.proc.pid, "bridge_pid": b.proc.pid}
                for r, s, b in zip(replicas, servers, bridges, strict=True)]}, indent=2) + "\n")

        write_state()
        stats = f"    router metrics  http://{args.host}:{args.stats_port}/metrics (stats: /stats)\n" \
            if args.stats_port else ""
        print(f"\n  tokenwire cluster is up: {replicas_n} replicas ({threads} threads each), chats in "
              f"{'PostgreSQL in ' + str(postgres.root) if postgres else 'the given database'}\n"
              f"    front door, HTTP  http://{args.host}:{args.http_port}/  (web chat, OpenAI base_url "
              f"http://{args.host}:{args.http_port}/v1)\n"
              f"    front door, gRPC  {args.host}:{args.grpc_port}\n{stats}"
              f"    logs              {logs}  (processes: {state})\n"
              "    Ctrl-C stops all of it.\n", flush=True)
        while not stopping:
            time.sleep(0.2)
            for child in servers:
                if child.alive() or child.restarts >= MAX_RESTARTS:
                    continue
                if not child.died_at:
                    child.died_at = time.monotonic()
                    print(f"tokenwire cluster: {child.name} exited ({child.proc.returncode}); starting it again",
                          flush=True)
                elif time.monotonic() - child.died_at >= RESTART_AFTER_S:
                    child.restarts += 1
                    child.died_at = 0.0
                    child.start()
                    write_state()
            if not router.alive():
                print(f"tokenwire cluster: the router exited; see {router.log}", file=sys.stderr)
                return 1
        return 0
    finally:
        # The front door first (no new work), then the servers drain, then the rest.
        by_name = {c.name: c for c in children}
        if "router" in by_name:
            by_name["router"].stop(5, signal.SIGUSR1)
        servers_up = [c for c in children if c.name.startswith("server")]
        for child in servers_up:
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        for child in servers_up:
            child.stop(args.drain_wait)
        for child in children:
            child.stop(10)
        if postgres is not None:
            postgres.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_cluster_command(sub) -> None:
    p = sub.add_parser("cluster", help="run replicas, PostgreSQL and a router (HAProxy) on this machine")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS") or 2))
    p.add_argument("--host", default="127.0.0.1", help="address of the front doors")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP front door")
    p.add_argument("--grpc-port", type=int, default=50050, help="gRPC front door")
    p.add_argument("--stats-port", type=int, default=8404, help="the router's Prometheus metrics, 0 = off")
    p.add_argument("--threads-per-replica", type=int, default=0, help="default: the cores split between replicas")
    p.add_argument("--database", default="", help="an external chat database URL; default: a PostgreSQL of "
                                                 "its own in FOLDER/postgres")
    p.add_argument("--postgres-port", type=int, default=0, help="its port (default: a free one)")
    p.add_argument("--folder", default=str(default_folder()), help="data, logs and the router's configuration")
    p.add_argument("--drain-wait", type=float, default=40.0, help="seconds the servers get to drain on stop")
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --: more `tokenwire serve` flags for every replica (e.g. -- --max-batch 8)")
    p.set_defaults(func=cmd_cluster)
