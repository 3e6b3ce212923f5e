"""SQLite persistence of turns and calls, so a notebook's chats survive a kernel restart.

One file in the user's data directory (``QwenMagic.store_path`` or ``QWEN_MAGIC_STORE``
names another), created with mode 0600, in WAL mode so that several kernels can write at
once. Every turn is committed on its own: a kernel killed mid-answer loses nothing earlier.
The schema is versioned (``PRAGMA user_version``) and migrated forward on open. No API key
is ever written here.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .i18n import N_, _

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
    # 2: which kernel writes each chat, so that two live kernels on one notebook (the
    # notebook open twice) never write over each other's turns.
    """
    CREATE TABLE claims (
        notebook TEXT NOT NULL,
        chat TEXT NOT NULL,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        PRIMARY KEY (notebook, chat)
    );
    """,
    # 3: batch jobs (DashScope's Batch API): one row per job of a cell, whatever the number of
    # batches it was split into, so that running the cell again attaches to it instead of
    # submitting twice, also after a kernel restart. ``record`` keeps the batches' details.
    """
    CREATE TABLE batch_jobs (
        id TEXT PRIMARY KEY,
        notebook TEXT NOT NULL,
        cell_key TEXT NOT NULL,
        template_digest TEXT NOT NULL,
        model TEXT NOT NULL,
        rows INTEGER NOT NULL,
        batch_ids TEXT NOT NULL,
        status TEXT NOT NULL,
        completed INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        submitted_at REAL NOT NULL,
        cost REAL,
        finished_at REAL,
        record TEXT NOT NULL
    );
    CREATE INDEX batch_jobs_cell ON batch_jobs (notebook, cell_key, submitted_at);
    """,
    # 4: the finished rows of jobs over collections (--map, --batch), keyed by the job (its
    # template, model and parameters) and the row's request, so that a job run again (after an
    # interrupt, an error, a kernel restart) sends only the rows without a result.
    """
    CREATE TABLE job_rows (
        job TEXT NOT NULL,
        row TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (job, row)
    ) WITHOUT ROWID;
    """,
    # 5: money across kernels. Each call's region and currency (spend in yuan and in dollars is
    # never added up), its cache and search figures; spending limits per user; and the open
    # reservations of calls in flight, so that every kernel checks a limit against them too.
    """
    ALTER TABLE calls ADD COLUMN currency TEXT NOT NULL DEFAULT 'CNY';
    ALTER TABLE calls ADD COLUMN region TEXT NOT NULL DEFAULT 'beijing';
    ALTER TABLE calls ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN cache_creation_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN searches INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX calls_at ON calls (at);
    CREATE TABLE spending_limits (
        user TEXT NOT NULL,
        period TEXT NOT NULL,
        currency TEXT NOT NULL,
        amount REAL NOT NULL,
        PRIMARY KEY (user, period, currency)
    );
    CREATE TABLE reservations (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        currency TEXT NOT NULL,
        amount REAL NOT NULL,
        what TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# Seconds a read or a command's write waits for another program's write to end.
LOCK_WAIT = 5.0
# The write after an answer waits less: the answer is on screen, and the cell should end.
QUICK_LOCK_WAIT = 1.0

LOCKED = N_("locked: another program is writing {path}. The answer is kept in this kernel and in the "
          "notebook; close that program (or let it finish) and later turns are saved again.")
DAMAGED = N_("the history file {path} is damaged ({error}). Run %qwen repair to move it aside "
           "(it is kept) and start a fresh one with what can still be read.")
FULL = N_("the disk holding {path} is full. Free some space; the answer is kept in this kernel and in the notebook.")
UNUSABLE = N_("the history file {path} cannot be used: {error}.")


def default_store_path() -> Path:
    named = os.environ.get("QWEN_MAGIC_STORE")
    if named:
        return expanded_path(named)
    return _platform_store_path(os.environ.get("XDG_DATA_HOME"), os.environ.get("HOME"))


def expanded_path(path: str) -> Path:
    """``Path(path).expanduser()``, worked out once per path and home (it is asked for every cell)."""
    return _expanded(path, os.environ.get("HOME") if path.startswith("~") else None)


@functools.lru_cache(maxsize=16)
def _expanded(path: str, _home: str | None) -> Path:
    return Path(path).expanduser()


@functools.lru_cache(maxsize=4)
def _platform_store_path(_data_home: str | None, _home: str | None) -> Path:
    """Asked of platformdirs once per value of what it reads (the arguments, only a key)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("qwen-magic")) / "history.sqlite3"


class StoreError(RuntimeError):
    """The history file could not be read or written; the message says which and why."""


def describe(error: sqlite3.Error | ValueError, path: Path) -> str:
    """What went wrong with the file, and what to do, as the rest of one sentence."""
    text = str(error)
    if isinstance(error, sqlite3.OperationalError) and "locked" in text:
        return _(LOCKED).format(path=path)
    if "disk is full" in text or getattr(error, "sqlite_errorname", "") == "SQLITE_FULL":
        return _(FULL).format(path=path)
    if isinstance(error, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        return _(DAMAGED).format(path=path, error=text)
    return _(UNUSABLE).format(path=path, error=text)


@dataclass(frozen=True)
class Owner:
    """One kernel process: the writer of the chats it claims."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def outlived(self, owner: str, host: str, pid: int) -> bool:
        """Has the kernel that wrote this claim ended (so its chats are free)?

        One process runs one live session (an earlier one of this process was unloaded). A
        kernel on another machine cannot be checked: it is taken to be alive, which keeps
        both kernels' turns apart rather than risking either.
        """
        if owner == self.id:
            return False
        if host != self.host:
            return False
        if not isinstance(pid, int):  # a claim no kernel of this package wrote
            return True
        return pid == self.pid or not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    """Does a process with this id run on this machine (the check sends nothing to it)?"""
    if pid <= 0:  # not a process: 0 and negative ids name process groups
        return False
    if os.name == "nt":  # os.kill would end the process there
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists, under another user
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, under another user
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """The name this kernel stores a chat under, and what claiming it changed."""

    name: str
    new: bool  # taken by this write (it was free, or its kernel had ended)
    kept: str | None = None  # where an ended kernel's turns of the chat were set aside


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _guarded(method: _Method) -> _Method:
    """Any SQLite failure becomes a ``StoreError`` that names the file and what to do."""

    @functools.wraps(method)
    def guarded(self: "Store", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, ValueError) as error:  # ValueError: a record that is not JSON
            raise StoreError(describe(error, self.path)) from None

    return guarded  # type: ignore[return-value]


class Store:
    """The history file. Methods are small transactions; records are plain JSON dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file private before SQLite opens it; its -wal and -shm files inherit the mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(path, 0o600)
            self._db = sqlite3.connect(path, timeout=LOCK_WAIT, isolation_level=None, check_same_thread=False)
            self._open_transaction = _Transaction(self._db, path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            stat = os.stat(path)
        except OSError as error:
            raise StoreError(_("cannot open the history file {path}: {error}").format(
                path=path, error=error.strerror or error)) from None
        except sqlite3.Error as error:
            raise StoreError(describe(error, path)) from None
        self._identity = (stat.st_dev, stat.st_ino)

    def replaced(self) -> bool:
        """Was the file deleted or replaced since it was opened (writes would go nowhere)?"""
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    @contextmanager
    def waiting_at_most(self, seconds: float | None) -> Iterator[None]:
        """Wait at most ``seconds`` for another program's lock (None: the usual wait)."""
        if seconds is None:
            yield
            return
        self._db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT * 1000)}")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(_("{path} was written by a newer qwen_magic (schema {version}); upgrade to read it").format(
                path=self.path, version=version))
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in _statements(MIGRATIONS[number]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def transaction(self) -> "_Transaction":
        """Group several writes into one commit (one call's row and its turn, together)."""
        return self._open_transaction

    # ---- turns

    @_guarded
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

    @_guarded
    def turns(self, notebook: str, chat: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT record FROM turns WHERE notebook = ? AND chat = ? ORDER BY position", (notebook, chat)
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    @_guarded
    def chat_names(self, notebook: str) -> list[str]:
        rows = self._db.execute(
            "SELECT chat FROM turns WHERE notebook = ? GROUP BY chat ORDER BY MIN(updated_at)", (notebook,)
        ).fetchall()
        return [row[0] for row in rows]

    @_guarded
    def delete_chat(self, notebook: str, chat: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM turns WHERE notebook = ? AND chat = ?", (notebook, chat))

    @_guarded
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

    @_guarded
    def delete_position(self, notebook: str, chat: str, position: int) -> None:
        with self.transaction():
            self._db.execute(
                "DELETE FROM turns WHERE notebook = ? AND chat = ? AND position = ?", (notebook, chat, position)
            )

    @_guarded
    def replace_chat(self, notebook: str, chat: str, records: Iterable[tuple[str | None, dict[str, Any]]]) -> None:
        """Rewrite a chat whole (a resume from a notebook file)."""
        with self.transaction():
            self._db.execute("DELETE FROM turns WHERE notebook = ? AND chat = ?", (notebook, chat))
            for position, (cell_id, record) in enumerate(records, start=1):
                self._db.execute(
                    "INSERT INTO turns (notebook, chat, position, cell_id, record, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (notebook, chat, position, cell_id, json.dumps(record, ensure_ascii=False), time.time()),
                )


    # ---- claims: which kernel writes a chat

    @_guarded
    def claim(self, notebook: str, chat: str, owner: Owner, *, holds: str | None = None) -> Claim:
        """The name under which ``owner`` writes ``chat``: the chat's own, or ``chat@N``.

        Checked in the write's transaction, so two live kernels never both hold a name: the
        second gets the first free ``chat@2``, ``chat@3``... ``holds`` is the name whose turns
        the kernel already has (it wrote or resumed them): it is kept while it can be. Any
        other name taken over from an ended kernel has that kernel's turns set aside first,
        not written over.
        """
        candidates = [holds] if holds else []
        with self.transaction():
            for number in itertools.count(1):
                numbered = chat if number == 1 else f"{chat}@{number}"
                for name in (*candidates, numbered):
                    row = self._db.execute(
                        "SELECT owner, host, pid FROM claims WHERE notebook = ? AND chat = ?", (notebook, name)
                    ).fetchone()
                    if row is not None and row[0] == owner.id:
                        return Claim(name, new=False)
                    if row is None or owner.outlived(*row):
                        self._db.execute(
                            "INSERT OR REPLACE INTO claims (notebook, chat, owner, host, pid) VALUES (?, ?, ?, ?, ?)",
                            (notebook, name, owner.id, owner.host, owner.pid),
                        )
                        kept = None if name == holds else self.set_aside(notebook, name)
                        return Claim(name, new=True, kept=kept)
                candidates = []
        raise AssertionError("unreachable")  # pragma: no cover

    @_guarded
    def release(self, owner: Owner) -> None:
        """The kernel is closing: its chats are free for the next one."""
        with self.transaction():
            self._db.execute("DELETE FROM claims WHERE owner = ?", (owner.id,))
            self._db.execute("DELETE FROM reservations WHERE owner = ?", (owner.id,))  # calls it had in flight

    # ---- calls

    @_guarded
    def add_call(self, notebook: str, chat: str | None, model: str, input_tokens: int, output_tokens: int,
                 cost: float | None, status: str, *, currency: str = "CNY", region: str = "beijing",
                 cached_tokens: int = 0, cache_creation_tokens: int = 0, searches: int = 0) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO calls (notebook, chat, model, input_tokens, output_tokens, cost, status, at, "
                "currency, region, cached_tokens, cache_creation_tokens, searches) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (notebook, chat, model, input_tokens, output_tokens, cost, status, time.time(),
                 currency, region, cached_tokens, cache_creation_tokens, searches),
            )

    @_guarded
    def totals_by_model(self) -> list[tuple[str, int, int, int, float, int]]:
        """All-time (model, calls, input tokens, output tokens, cost, unpriced calls), across notebooks."""
        return self._db.execute(
            "SELECT model, COUNT(*), SUM(input_tokens), SUM(output_tokens), COALESCE(SUM(cost), 0), "
            "SUM(cost IS NULL) FROM calls GROUP BY model ORDER BY model"
        ).fetchall()

    # ---- batch jobs (qwen_magic.jobs.batch writes them; %qwen jobs lists them)

    _JOB_COLUMNS = ("id", "notebook", "cell_key", "template_digest", "model", "rows", "batch_ids", "status",
                    "completed", "failed", "submitted_at", "cost", "finished_at", "record")

    @_guarded
    def save_batch_job(self, job: dict[str, Any]) -> None:
        """Insert or update a job, given as a dict with the table's columns (``batch_ids`` a list,
        ``record`` a dict)."""
        values = dict(job)
        values["batch_ids"] = json.dumps(list(values["batch_ids"]))
        values["record"] = json.dumps(values.get("record") or {}, ensure_ascii=False)
        columns = self._JOB_COLUMNS
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns if name != "id")
        with self.transaction():
            self._db.execute(
                f"INSERT INTO batch_jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT (id) DO UPDATE SET {updates}",
                tuple(values.get(name) for name in columns),
            )

    @_guarded
    def batch_job(self, job_id: str) -> dict[str, Any] | None:
        """The job with this id, or whose batches include this batch id; None if none."""
        row = self._db.execute(f"SELECT {', '.join(self._JOB_COLUMNS)} FROM batch_jobs WHERE id = ?",
                               (job_id,)).fetchone()
        if row is None:
            qualified = ", ".join(f"batch_jobs.{name}" for name in self._JOB_COLUMNS)
            row = self._db.execute(
                f"SELECT {qualified} FROM batch_jobs, json_each(batch_jobs.batch_ids) "
                "WHERE json_each.value = ? ORDER BY batch_jobs.submitted_at DESC LIMIT 1", (job_id,)).fetchone()
        return None if row is None else self._job_from(row)

    @_guarded
    def batch_job_for_cell(self, notebook: str, cell_key: str, template_digest: str | None = None) -> dict[str, Any] | None:
        """The latest job of a cell (of this template, when given): what a re-run attaches to."""
        query = f"SELECT {', '.join(self._JOB_COLUMNS)} FROM batch_jobs WHERE notebook = ? AND cell_key = ?"
        parameters: tuple[Any, ...] = (notebook, cell_key)
        if template_digest is not None:
            query += " AND template_digest = ?"
            parameters += (template_digest,)
        row = self._db.execute(query + " ORDER BY submitted_at DESC LIMIT 1", parameters).fetchone()
        return None if row is None else self._job_from(row)

    @_guarded
    def batch_jobs(self, notebook: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs, newest first (of one notebook, when given)."""
        query = f"SELECT {', '.join(self._JOB_COLUMNS)} FROM batch_jobs"
        parameters: tuple[Any, ...] = ()
        if notebook is not None:
            query += " WHERE notebook = ?"
            parameters = (notebook,)
        rows = self._db.execute(query + " ORDER BY submitted_at DESC LIMIT ?", (*parameters, limit)).fetchall()
        return [self._job_from(row) for row in rows]

    @_guarded
    def delete_batch_job(self, job_id: str) -> None:
        """Forget a job (one whose submission failed before any batch was created)."""
        with self.transaction():
            self._db.execute("DELETE FROM batch_jobs WHERE id = ?", (job_id,))

    def _job_from(self, row: tuple[Any, ...]) -> dict[str, Any]:
        job = dict(zip(self._JOB_COLUMNS, row))
        job["batch_ids"] = json.loads(job["batch_ids"])
        job["record"] = json.loads(job["record"])
        return job
    # ---- job rows (--map, --batch): each finished row of a job, for resuming it

    @_guarded
    def save_job_rows(self, job: str, rows: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
        """Write ``(row digest, status, record)`` rows of ``job`` in one commit (a row done again
        replaces its earlier record); return how many."""
        now = time.time()
        data = [(job, row, status, json.dumps(record, ensure_ascii=False), now) for row, status, record in rows]
        with self.transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO job_rows (job, row, status, record, at) VALUES (?, ?, ?, ?, ?)", data
            )
        return len(data)

    @_guarded
    def job_rows(self, job: str, status: str = "complete") -> dict[str, dict[str, Any]]:
        """The records of ``job``'s rows with ``status``, by row digest."""
        found = self._db.execute("SELECT row, record FROM job_rows WHERE job = ? AND status = ?", (job, status))
        return {row: json.loads(record) for row, record in found}

    @_guarded
    def job_row_digests(self, job: str, status: str = "complete") -> set[str]:
        """Which rows of ``job`` have ``status`` (their records are not read)."""
        found = self._db.execute("SELECT row FROM job_rows WHERE job = ? AND status = ?", (job, status))
        return {row for (row,) in found}
    # ---- spending: limits, reservations of calls in flight, spend per period (spending.py)

    @_guarded
    def set_limit(self, user: str, period: str, currency: str, amount: float | None) -> None:
        """Set a daily or monthly limit in ``currency`` (None removes it)."""
        with self.transaction():
            if amount is None:
                self._db.execute("DELETE FROM spending_limits WHERE user = ? AND period = ? AND currency = ?",
                                 (user, period, currency))
            else:
                self._db.execute("INSERT OR REPLACE INTO spending_limits (user, period, currency, amount) "
                                 "VALUES (?, ?, ?, ?)", (user, period, currency, amount))

    @_guarded
    def limits(self, user: str, currency: str) -> dict[str, float]:
        """period -> amount, of the limits in ``currency``."""
        rows = self._db.execute("SELECT period, amount FROM spending_limits WHERE user = ? AND currency = ?",
                                (user, currency)).fetchall()
        return {period: amount for period, amount in rows}

    @_guarded
    def spent_since(self, currency: str, since: float) -> float:
        """Cost of the calls in ``currency`` made at or after ``since`` (Unix time)."""
        return self._db.execute("SELECT COALESCE(SUM(cost), 0) FROM calls WHERE currency = ? AND at >= ?",
                                (currency, since)).fetchone()[0]

    @_guarded
    def open_reservations(self, user: str, currency: str) -> list[tuple[int, str, str, int, float, float]]:
        """(id, owner, host, pid, amount, at) of the reservations in ``currency``."""
        return self._db.execute("SELECT id, owner, host, pid, amount, at FROM reservations "
                                "WHERE user = ? AND currency = ?", (user, currency)).fetchall()

    @_guarded
    def add_reservation(self, user: str, owner: Owner, currency: str, amount: float, what: str) -> int:
        with self.transaction():
            cursor = self._db.execute(
                "INSERT INTO reservations (user, owner, host, pid, currency, amount, what, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user, owner.id, owner.host, owner.pid, currency, amount, what, time.time()))
        return int(cursor.lastrowid or 0)

    @_guarded
    def change_reservation(self, reservation: int, owner: Owner, amount: float | None) -> None:
        """Hold ``amount`` now (None: release it); only ``owner``'s own (a file replaced meanwhile may reuse ids)."""
        with self.transaction():
            if amount is None:
                self._db.execute("DELETE FROM reservations WHERE id = ? AND owner = ?", (reservation, owner.id))
            else:
                self._db.execute("UPDATE reservations SET amount = ? WHERE id = ? AND owner = ?",
                                 (amount, reservation, owner.id))

    @_guarded
    def release_reservations(self, ids: Iterable[int]) -> None:
        with self.transaction():
            self._db.executemany("DELETE FROM reservations WHERE id = ?", [(i,) for i in ids])

    @_guarded
    def spend_by(self, column: str, currency: str, since: float) -> list[tuple[str, int, float]]:
        """(model or notebook, calls, cost) of the calls in ``currency`` since ``since``, costliest first."""
        if column not in ("model", "notebook"):
            raise ValueError(f"no spend by {column}")
        return self._db.execute(
            f"SELECT {column}, COUNT(*), COALESCE(SUM(cost), 0) FROM calls WHERE currency = ? AND at >= ? "
            f"GROUP BY {column} ORDER BY 3 DESC, 1", (currency, since)).fetchall()

    @_guarded
    def calls_since(self, currency: str, since: float) -> list[tuple[float, str, float]]:
        """(at, model, cost) of the priced calls in ``currency`` since ``since`` (the chart's days)."""
        return self._db.execute("SELECT at, model, cost FROM calls WHERE currency = ? AND at >= ? "
                                "AND cost IS NOT NULL ORDER BY at", (currency, since)).fetchall()

    @_guarded
    def tokens_by_model(self, region: str) -> list[tuple[str, int, int, int]]:
        """All-time (model, input tokens, output tokens, searches) of the calls made in ``region``."""
        return self._db.execute(
            "SELECT model, SUM(input_tokens), SUM(output_tokens), SUM(searches) FROM calls WHERE region = ? "
            "GROUP BY model ORDER BY model", (region,)).fetchall()

    @_guarded
    def currencies(self) -> list[str]:
        """The currencies the recorded calls were billed in."""
        return [row[0] for row in self._db.execute("SELECT DISTINCT currency FROM calls ORDER BY currency")]

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: a turn is written whole or not at all.

    Nested uses join the outermost one, which alone commits or rolls back. A lock, a full
    disk or a damaged file is a ``StoreError`` that says so.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreError(describe(error, self._path)) from None
        self._depth += 1

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._depth -= 1
        if self._depth:
            return
        if kind is not None:
            self._rollback()
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as failure:
            self._rollback()
            raise StoreError(describe(failure, self._path)) from None

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def check(path: Path) -> str | None:
    """None if the file reads whole, else what is wrong with it."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=LOCK_WAIT)
    except sqlite3.Error as error:
        return str(error)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.Error as error:
        return str(error)
    finally:
        db.close()
    return None if problems == ["ok"] else "; ".join(problems[:3])


def repair(path: Path) -> tuple[Path, int, int]:
    """Move a damaged file aside (kept, dated) and start a fresh one with the rows still readable.

    Return where the damaged file went, and how many turns and calls were carried over.
    """
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    number = 1
    while aside.exists():  # repaired twice in a second: both damaged files are kept
        number += 1
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{number}")
    for suffix in ("", "-wal", "-shm"):  # the journal belongs to its file: it moves with it
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{aside}{suffix}"))
    fresh = Store(path)
    try:
        turns = _salvage(aside, fresh, "turns", ("notebook", "chat", "position", "cell_id", "record", "updated_at"))
        columns = ("notebook", "chat", "model", "input_tokens", "output_tokens", "cost", "status", "at")
        # Each call's currency and region come along (a file older than them has none to give).
        calls = (_salvage(aside, fresh, "calls", columns + ("currency", "region", "cached_tokens",
                                                            "cache_creation_tokens", "searches"))
                 or _salvage(aside, fresh, "calls", columns))
    finally:
        fresh.close()
    return aside, turns, calls


def _salvage(damaged: Path, fresh: Store, table: str, columns: tuple[str, ...]) -> int:
    """Copy the rows of ``table`` that can still be read into the fresh file; return how many.

    Row by row, by id: a damaged page loses the rows on it, not the rows after it.
    """
    names = ", ".join(columns)
    insert = f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"
    try:
        source = sqlite3.connect(damaged, isolation_level=None)
    except sqlite3.Error:
        return 0
    copied = 0
    try:
        last = _last_id(source, table)
        with fresh.transaction():
            for row_id in range(1, last + 1):
                try:
                    row = source.execute(f"SELECT {names} FROM {table} WHERE id = ?", (row_id,)).fetchone()
                except sqlite3.Error:
                    continue
                if row is not None:
                    fresh._db.execute(insert, row)
                    copied += 1
    finally:
        source.close()
    return copied


def _last_id(source: sqlite3.Connection, table: str) -> int:
    """The highest row id that can be found (0 if none can)."""
    try:
        return source.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0] or 0
    except sqlite3.Error:
        pass
    last = 0
    try:
        for (row_id,) in source.execute(f"SELECT id FROM {table}"):
            last = max(last, row_id)
    except sqlite3.Error:
        pass
    return last
