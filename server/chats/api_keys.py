"""API keys: made at random, shown once, stored only as their SHA-256.

A key is 32 random bytes (so a plain hash is as strong as any slow one: there is nothing to
guess). The server asks for keys once any key that is not revoked exists; each key belongs
to a user, created with it if new.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .db import ApiKey, User, now_ms, write_transaction

KEY_PREFIX = "tw_"
SHOWN_PREFIX_CHARS = 10  # "tw_" and 7 more: enough to tell keys apart, useless to guess one


@dataclass
class KeyInfo:
    id: int
    user: str
    prefix: str
    created_ms: int
    revoked_ms: int | None
    admin: bool = False


@dataclass
class KeyOwner:
    user_id: int
    user: str
    admin: bool = False  # may manage models (load, unload, keep one loaded)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Key management over the chat database (open it first: ChatStore or open_database)."""

    def __init__(self, db) -> None:
        self.db = db

    def create(self, user_name: str, admin: bool = False) -> tuple[str, KeyInfo]:
        """A new key for `user_name` (the user is created if new); the key itself is returned
        once and never stored. An admin key may also manage models."""
        name = user_name.strip()
        if not name or len(name) > 64 or any(c.isspace() for c in name):
            raise ValueError("a user name is 1 to 64 characters without spaces")
        key = new_key()
        with write_transaction(self.db):
            user, _ = User.get_or_create(name=name)
            row = ApiKey.create(user=user, key_hash=hash_key(key), prefix=key[:SHOWN_PREFIX_CHARS], admin=admin)
        return key, KeyInfo(row.id, name, row.prefix, row.created_ms, None, admin)

    def list(self) -> list[KeyInfo]:
        rows = ApiKey.select(ApiKey, User.name).join(User).order_by(ApiKey.id).objects()
        return [KeyInfo(r.id, r.name, r.prefix, r.created_ms, r.revoked_ms, bool(r.admin)) for r in rows]

    def revoke(self, which: str) -> list[KeyInfo]:
        """Revokes the key with this id or shown prefix, or every key of the user with this name."""
        keys = [k for k in self.list() if k.revoked_ms is None]
        match = ([k for k in keys if str(k.id) == which] or [k for k in keys if k.prefix == which]
                 or [k for k in keys if k.user == which])
        if not match:
            return []
        with write_transaction(self.db):
            ApiKey.update(revoked_ms=now_ms()).where(ApiKey.id.in_([k.id for k in match])).execute()
        return match

    def any_active(self) -> bool:
        return ApiKey.select().where(ApiKey.revoked_ms.is_null()).exists()

    def required(self) -> bool:
        """Whether calls need a key: once a key was created, until `disable` (revoking the last key
        leaves the server locked, never silently open)."""
        return ApiKey.select().exists()

    def disable(self) -> int:
        """Turns keys off (every call is the local user's again): forgets every key, revoked ones
        too. Returns how many there were."""
        with write_transaction(self.db):
            return ApiKey.delete().execute()

    def owner_of(self, key: str) -> KeyOwner | None:
        """The user a presented key belongs to; None for unknown or revoked keys."""
        digest = hash_key(key)
        row = (ApiKey.select(ApiKey, User.name, User.id.alias("uid")).join(User)
               .where((ApiKey.key_hash == digest) & ApiKey.revoked_ms.is_null()).objects().first())
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return KeyOwner(row.uid, row.name, bool(row.admin))
