"""The chat database: peewee models for users, API keys, chats and messages, and opening it.

SQLite (the default) runs in WAL mode with a busy timeout, so readers never block the writer
and a second process (`tokenwire keys create` while the server runs) waits instead of failing;
its write transactions start IMMEDIATE so two writers never deadlock upgrading a read lock.
A `postgresql://user@host:port/db` URL stores the chats in PostgreSQL (a connection pool; keyword
search with a tsvector column, a GIN index and ts_headline snippets); any other
`playhouse.db_url` URL works too, with keyword search falling back to LIKE.

Schema changes are migrations: `MIGRATIONS[n]` takes the database from version n to n + 1,
and `open_database` applies the missing ones in order (the version lives in `schema_version`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import peewee as pw
from playhouse.db_url import connect

# How long one SQLite statement waits for another process's write lock. Short on purpose: the
# server retries a reply it could not store (with back-off, journaled meanwhile) instead of
# holding its one writer thread for long; $TOKENWIRE_DB_BUSY_TIMEOUT overrides it (seconds).
BUSY_TIMEOUT_S = float(os.environ.get("TOKENWIRE_DB_BUSY_TIMEOUT") or 5.0)
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",  # with WAL: durable at checkpoints, never corrupt
    "foreign_keys": 1,
    "busy_timeout": int(BUSY_TIMEOUT_S * 1000),
}

database_proxy = pw.DatabaseProxy()


def now_ms() -> int:
    return int(time.time() * 1000)


def default_database_path() -> Path:
    """`~/.local/share/tokenwire/tokenwire.db` (beside the model store; XDG_DATA_HOME honoured)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "tokenwire" / "tokenwire.db"


def default_database() -> str:
    """$TOKENWIRE_DATABASE (a path or a playhouse.db_url URL), else the default path."""
    return os.environ.get("TOKENWIRE_DATABASE") or str(default_database_path())


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class User(BaseModel):
    name = pw.CharField(max_length=64, unique=True)
    created_ms = pw.BigIntegerField(default=now_ms)


class ApiKey(BaseModel):
    user = pw.ForeignKeyField(User, backref="keys", on_delete="CASCADE")
    key_hash = pw.CharField(max_length=64, unique=True)  # sha256 hex of the whole key
    prefix = pw.CharField(max_length=16)  # the key's first characters, to tell keys apart
    created_ms = pw.BigIntegerField(default=now_ms)
    revoked_ms = pw.BigIntegerField(null=True)
    admin = pw.BooleanField(default=False)  # schema 3: may manage models and read every metric


class Chat(BaseModel):
    public_id = pw.CharField(max_length=32, unique=True)
    owner = pw.ForeignKeyField(User, backref="chats", on_delete="CASCADE")
    title = pw.TextField(default="")
    model = pw.CharField(max_length=200, default="")
    created_ms = pw.BigIntegerField(default=now_ms)
    updated_ms = pw.BigIntegerField(default=now_ms)

    class Meta:
        indexes = ((("owner", "updated_ms"), False),)


class Message(BaseModel):
    chat = pw.ForeignKeyField(Chat, backref="messages", on_delete="CASCADE")
    seq = pw.IntegerField()  # position in its chat, from 1
    role = pw.CharField(max_length=16)
    content = pw.TextField(default="")
    status = pw.CharField(max_length=16, default="complete")
    error_message = pw.TextField(default="")
    model = pw.CharField(max_length=200, default="")
    params = pw.TextField(default="")  # JSON: sampling parameters, max_tokens, stop
    prompt_tokens = pw.IntegerField(default=0)
    completion_tokens = pw.IntegerField(default=0)
    dropped_messages = pw.IntegerField(default=0)
    time_to_first_token_ms = pw.FloatField(default=0.0)
    decode_tokens_per_second = pw.FloatField(default=0.0)
    total_time_ms = pw.FloatField(default=0.0)
    queue_time_ms = pw.FloatField(default=0.0)
    cached_prompt_tokens = pw.IntegerField(default=0)  # schema 2
    writer = pw.CharField(max_length=100, default="")  # schema 4: the server writing a pending reply
    # Schema 6: an assistant message's tool calls (JSON: [{"id", "name", "arguments"}]), a tool
    # result's call id and function name, and a reply's thinking (kept apart from its content).
    tool_calls = pw.TextField(default="")
    tool_call_id = pw.CharField(max_length=100, default="")
    name = pw.CharField(max_length=64, default="")
    reasoning = pw.TextField(default="")
    created_ms = pw.BigIntegerField(default=now_ms)

    class Meta:
        indexes = ((("chat", "seq"), True),)


class MessageImage(BaseModel):
    """Schema 7: an image sent with a message, and the text the server read in it (in the database,
    so every replica sharing it sees the image; its bytes count in the chat's size)."""

    message = pw.ForeignKeyField(Message, backref="images", on_delete="CASCADE")
    position = pw.IntegerField()  # its place among the message's images, from 0
    media_type = pw.CharField(max_length=32)
    data = pw.BlobField()
    text = pw.TextField(default="")

    class Meta:
        indexes = ((("message", "position"), True),)


class ServerLease(BaseModel):
    """Schema 4: a server using this database, renewed while it runs (see ChatStore.mark_interrupted)."""

    instance = pw.CharField(max_length=100, unique=True)
    host = pw.CharField(max_length=255)
    pid = pw.IntegerField()
    heartbeat_ms = pw.BigIntegerField(default=now_ms)


class SchemaVersion(BaseModel):
    version = pw.IntegerField()


MODELS = [User, ApiKey, Chat, Message, MessageImage, ServerLease, SchemaVersion]

# An external-content FTS5 index over message.content, kept in step by triggers.
_FTS_SQL = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS message_fts USING fts5("
    "content, content='message', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS message_fts_insert AFTER INSERT ON message BEGIN "
    "INSERT INTO message_fts(rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER IF NOT EXISTS message_fts_delete AFTER DELETE ON message BEGIN "
    "INSERT INTO message_fts(message_fts, rowid, content) VALUES ('delete', old.id, old.content); END",
    "CREATE TRIGGER IF NOT EXISTS message_fts_update AFTER UPDATE OF content ON message BEGIN "
    "INSERT INTO message_fts(message_fts, rowid, content) VALUES ('delete', old.id, old.content); "
    "INSERT INTO message_fts(rowid, content) VALUES (new.id, new.content); END",
]


def is_sqlite(db: pw.Database) -> bool:
    return isinstance(db, pw.SqliteDatabase)


def _initial_schema(db: pw.Database) -> None:
    db.create_tables([User, ApiKey, Chat, Message])
    if is_sqlite(db):
        for sql in _FTS_SQL:
            db.execute_sql(sql)


def _add_cached_prompt_tokens(db: pw.Database) -> None:
    """Schema 2: how many prompt tokens of a reply came from the prefix cache (part of its Usage).
    A database created at schema 2 has the column from the model already."""
    if "cached_prompt_tokens" in {c.name for c in db.get_columns("message")}:
        return
    from playhouse.migrate import SchemaMigrator, migrate

    migrate(SchemaMigrator.from_database(db).add_column("message", "cached_prompt_tokens", pw.IntegerField(default=0)))


def _add_key_roles(db: pw.Database) -> None:
    """Schema 3: admin keys (model management needs one once the server has keys)."""
    if "admin" in {c.name for c in db.get_columns("api_key")}:
        return
    from playhouse.migrate import SchemaMigrator, migrate

    migrate(SchemaMigrator.from_database(db).add_column("api_key", "admin", pw.BooleanField(default=False)))


def _add_reply_writers(db: pw.Database) -> None:
    """Schema 4: which server writes a pending reply, and the servers' leases, so a server starting
    marks interrupted only the replies of servers that are gone."""
    db.create_tables([ServerLease])
    if "writer" in {c.name for c in db.get_columns("message")}:
        return
    from playhouse.migrate import SchemaMigrator, migrate

    migrate(SchemaMigrator.from_database(db).add_column("message", "writer", pw.CharField(max_length=100, default="")))


# PostgreSQL's native keyword search: a generated tsvector column and a GIN index over it.
_PG_SEARCH_SQL = [
    "ALTER TABLE message ADD COLUMN IF NOT EXISTS content_tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED",
    "CREATE INDEX IF NOT EXISTS message_content_tsv ON message USING GIN (content_tsv)",
]


def is_postgres(db: pw.Database) -> bool:
    return isinstance(db, pw.PostgresqlDatabase)


def _add_native_search(db: pw.Database) -> None:
    """Schema 5: keyword search in PostgreSQL itself (SQLite has had FTS5 since schema 1)."""
    if is_postgres(db):
        for sql in _PG_SEARCH_SQL:
            db.execute_sql(sql)


# Schema 6's columns (see Message).
_TOOL_COLUMNS = {"tool_calls": pw.TextField(default=""), "tool_call_id": pw.CharField(max_length=100, default=""),
                 "name": pw.CharField(max_length=64, default=""), "reasoning": pw.TextField(default="")}


def _add_tool_messages(db: pw.Database) -> None:
    """Schema 6: tool calls and results in chats, and replies' thinking apart from their text."""
    have = {c.name for c in db.get_columns("message")}
    missing = [(name, column) for name, column in _TOOL_COLUMNS.items() if name not in have]
    if not missing:
        return
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    migrate(*(migrator.add_column("message", name, column) for name, column in missing))


def _add_message_images(db: pw.Database) -> None:
    """Schema 7: images in messages (their bytes and the text read in them)."""
    db.create_tables([MessageImage])


MIGRATIONS: list[Callable[[pw.Database], None]] = [_initial_schema, _add_cached_prompt_tokens, _add_key_roles,
                                                   _add_reply_writers, _add_native_search, _add_tool_messages,
                                                   _add_message_images]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer tokenwire."""


def write_transaction(db: pw.Database):
    """A transaction that takes the write lock at once (SQLite: BEGIN IMMEDIATE)."""
    return db.atomic("IMMEDIATE") if is_sqlite(db) else db.atomic()


# A PostgreSQL URL gets a connection pool: the writer and reader threads of each server hold one
# connection each, and replicas share the server (?max_connections=N in the URL overrides it).
PG_POOL = {"max_connections": 16, "stale_timeout": 300}


def _connect(target: str) -> pw.Database:
    if "://" in target:
        url = target
        if url.startswith("sqlite"):
            return connect(url, pragmas=SQLITE_PRAGMAS, timeout=BUSY_TIMEOUT_S)
        scheme, rest = url.split("://", 1)
        if scheme in ("postgres", "postgresql"):
            return connect(f"postgresql+pool://{rest}", **{k: v for k, v in PG_POOL.items() if f"{k}=" not in rest})
        return connect(url)
    path = Path(target).expanduser()
    _create_private(path)
    return pw.SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS, timeout=BUSY_TIMEOUT_S)


def _create_private(path: Path) -> None:
    """Chats are private: a new database folder is 0700 and a new database file 0600 (SQLite gives
    its -wal and -shm files the database file's mode). Existing ones are left as they are."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def open_database(target: str | None = None) -> pw.Database:
    """Opens (creating and migrating as needed) the chat database at a path or URL and binds the
    models to it. One chat database per process: opening another rebinds the models."""
    db = _connect(target or default_database())
    database_proxy.initialize(db)
    db.connect(reuse_if_open=True)
    with write_transaction(db):
        if is_postgres(db):  # replicas starting together migrate one at a time
            db.execute_sql("SELECT pg_advisory_xact_lock(7271727)")
        db.create_tables([SchemaVersion])
        row = SchemaVersion.select().first()
        version = row.version if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"the chat database {describe(db)} has schema version {version}; this tokenwire "
                               f"knows up to {SCHEMA_VERSION}: upgrade tokenwire")
        for step in MIGRATIONS[version:]:
            step(db)
        if row is None:
            SchemaVersion.create(version=SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            SchemaVersion.update(version=SCHEMA_VERSION).execute()
    return db


def describe(db: pw.Database) -> str:
    """Where the database is, for logs."""
    return db.database if is_sqlite(db) else f"{type(db).__name__}({db.database})"
