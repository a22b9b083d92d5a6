"""`tokenwire serve` refuses a chat database written by a newer tokenwire with one clear line."""

from __future__ import annotations

import subprocess

from conftest import cli, free_port

from tokenwire.server.chats import db as chat_db


def test_a_newer_database_is_one_clear_line(tmp_path) -> None:
    path = tmp_path / "newer.db"
    database = chat_db.open_database(str(path))
    chat_db.SchemaVersion.update(version=chat_db.SCHEMA_VERSION + 1).execute()
    database.close()
    done = subprocess.run(cli("serve", "--database", str(path), "--port", str(free_port()), "--metrics-port", "0",
                              "--models-dir", str(tmp_path / "no-models")), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("tokenwire: the chat database")
    assert "Traceback" not in done.stderr and "upgrade tokenwire" in done.stderr
