"""SQLite persistence of turns and calls, so a notebook's chats survive a kernel restart.

One file in the user's data directory (``QwenMagic.store_path`` or ``QWEN_MAGIC_STORE``
names another), created with mode 0600, in WAL mode so that several kernels can write at
once. Every turn is committed on its own: a kernel killed mid-answer loses nothing earlier.
The schema is versioned (``PRAGMA user_version``) and migrated forward on open. No API key
is ever written here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

MIGRATIONS: tuple[str, ...] = (
    # 1: turns (one per chat position; replaced in place when its cell re-runs) and calls
    # (every call ever made, for all-time usage: a replaced turn's call still cost money).
    """
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY,
        notebook TEXT NOT NULL,
        chat TEXT NOT NULL,
        position INTEGER NOT NULL,
        cell_id TEXT,
        record TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX turns_position ON turns (notebook, chat, position);
    CREATE UNIQUE INDEX turns_cell ON turns (notebook, chat, cell_id) WHERE cell_id IS NOT NULL;
    CREATE TABLE calls (
        id INTEGER PRIMARY KEY,
        notebook TEXT NOT NULL,
        chat TEXT,
        model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost REAL,
        status TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX calls_model ON calls (model);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_store_path() -> Path:
    named = os.environ.get("QWEN_MAGIC_STORE")
    if named:
        return Path(named).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("qwen-magic")) / "history.sqlite3"


class StoreError(RuntimeError):
    """The history file could not be read or written; the message says which and why."""


class Store:
    """The history file. Methods are small transactions; records are plain JSON dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file private before SQLite opens it; its -wal and -shm files inherit the mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(path, 0o600)
            self._db = sqlite3.connect(path, timeout=15, isolation_level=None, check_same_thread=False)
            self._open_transaction = _Transaction(self._db)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the history file {path}: {error}") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer qwen_magic (schema {version}); upgrade to read it"
            )
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in _statements(MIGRATIONS[number]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def transaction(self) -> "_Transaction":
        """Group several writes into one commit (one call's row and its turn, together)."""
        return self._open_transaction

    # ---- turns

    def save_turn(self, notebook: str, chat: str, position: int, cell_id: str | None, record: dict[str, Any]) -> None:
        """Write a chat's turn at ``position`` (replacing what stood there, or that cell's turn)."""
        data = json.dumps(record, ensure_ascii=False)
        with self.transaction():
            if cell_id is not None:
                self._db.execute(
                    "DELETE FROM turns WHERE notebook = ? AND chat = ? AND cell_id = ? AND position != ?",
                    (notebook, chat, cell_id, position),
                )
            self._db.execute(
                "INSERT INTO turns (notebook, chat, position, cell_id, record, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (notebook, chat, position) DO UPDATE SET cell_id = excluded.cell_id, "
                "record = excluded.record, updated_at = excluded.updated_at",
                (notebook, chat, position, cell_id, data, time.time()),
            )

    def turns(self, notebook: str, chat: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT record FROM turns WHERE notebook = ? AND chat = ? ORDER BY position", (notebook, chat)
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def chat_names(self, notebook: str) -> list[str]:
        rows = self._db.execute(
            "SELECT chat FROM turns WHERE notebook = ? GROUP BY chat ORDER BY MIN(updated_at)", (notebook,)
        ).fetchall()
        return [row[0] for row in rows]

    def delete_chat(self, notebook: str, chat: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM turns WHERE notebook = ? AND chat = ?", (notebook, chat))

    def set_aside(self, notebook: str, chat: str) -> str | None:
        """Rename a chat's stored turns out of the way; return the new name (None if none).

        A new kernel's first turn must not mix with an earlier kernel's turns, and those
        turns must not be lost either: they stay resumable under the returned name.
        """
        with self.transaction():
            found = self._db.execute(
                "SELECT MAX(updated_at) FROM turns WHERE notebook = ? AND chat = ?", (notebook, chat)
            ).fetchone()[0]
            if found is None:
                return None
            kept = f"{chat}@{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(found))}"
            self._db.execute("DELETE FROM turns WHERE notebook = ? AND chat = ?", (notebook, kept))
            self._db.execute("UPDATE turns SET chat = ? WHERE notebook = ? AND chat = ?", (kept, notebook, chat))
        return kept

    def delete_position(self, notebook: str, chat: str, position: int) -> None:
        with self.transaction():
            self._db.execute(
                "DELETE FROM turns WHERE notebook = ? AND chat = ? AND position = ?", (notebook, chat, position)
            )

    def replace_chat(self, notebook: str, chat: str, records: Iterable[tuple[str | None, dict[str, Any]]]) -> None:
        """Rewrite a chat whole (a resume from a notebook file)."""
        with self.transaction():
            self._db.execute("DELETE FROM turns WHERE notebook = ? AND chat = ?", (notebook, chat))
            for position, (cell_id, record) in enumerate(records, start=1):
                self._db.execute(
                    "INSERT INTO turns (notebook, chat, position, cell_id, record, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (notebook, chat, position, cell_id, json.dumps(record, ensure_ascii=False), time.time()),
                )

    # ---- calls

    def add_call(self, notebook: str, chat: str | None, model: str, input_tokens: int, output_tokens: int,
                 cost: float | None, status: str) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO calls (notebook, chat, model, input_tokens, output_tokens, cost, status, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (notebook, chat, model, input_tokens, output_tokens, cost, status, time.time()),
            )

    def totals_by_model(self) -> list[tuple[str, int, int, int, float, int]]:
        """All-time (model, calls, input tokens, output tokens, cost, unpriced calls), across notebooks."""
        return self._db.execute(
            "SELECT model, COUNT(*), SUM(input_tokens), SUM(output_tokens), COALESCE(SUM(cost), 0), "
            "SUM(cost IS NULL) FROM calls GROUP BY model ORDER BY model"
        ).fetchall()

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: a turn is written whole or not at all.

    Nested uses join the outermost one, which alone commits or rolls back.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]
