"""Reply outcomes the database has not taken yet, kept on disk until it does.

When storing how a reply ended fails (the database locked past its busy timeout, the disk
full, a PostgreSQL connection lost), the outcome is written here: one small JSON file per
reply in a private folder beside an SQLite database (`tokenwire.db.replies/<reply id>.json`,
0700/0600, written to a temporary name and renamed, so a crash leaves a whole file or none).
The file goes once the outcome is stored. A server opening the database first stores what
the folder holds: a reply finished before a crash is not reported as interrupted.

Storing an outcome only changes a reply that is still pending, so replaying an entry twice,
or one another server sharing the database stored meanwhile, changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from tokenwire.server.engine.records import Usage

from .store import ReplyOutcome

log = logging.getLogger("tokenwire.chats")


class ReplyJournal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def beside(cls, database_path: str) -> ReplyJournal:
        return cls(Path(database_path + ".replies"))

    def add(self, reply_id: int, outcome: ReplyOutcome) -> bool:
        """Keeps the outcome on disk; False when it cannot be written (the disk is full too):
        it is then kept in memory only."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            final = self.folder / f"{int(reply_id)}.json"
            temporary = final.with_suffix(".tmp")
            fd = os.open(temporary, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"reply_id": int(reply_id), **asdict(outcome)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
            return True
        except OSError as exc:
            log.error("could not journal reply %d either (%s): it is kept in memory only", reply_id, exc)
            return False

    def remove(self, reply_id: int) -> None:
        try:
            (self.folder / f"{int(reply_id)}.json").unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the journal entry of reply %d: %s", reply_id, exc)

    def entries(self) -> list[tuple[int, ReplyOutcome]]:
        """Every whole entry, oldest reply first (an unreadable file is logged and skipped)."""
        found = []
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                usage = Usage(**data.pop("usage", {}))
                reply_id = int(data.pop("reply_id"))
                found.append((reply_id, ReplyOutcome(usage=usage, **data)))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("skipping the unreadable reply journal entry %s: %s", path, exc)
        return sorted(found, key=lambda item: item[0])
