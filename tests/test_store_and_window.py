"""The history file and the context window (pure code, a real SQLite file)."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from qwen_magic.client import Usage
from qwen_magic.conversation import Chat, Turn, fit_window, messages_for
from qwen_magic.result import FAILED, INTERRUPTED, QwenResult
from qwen_magic.store import SCHEMA_VERSION, Store, StoreError


def turn(prompt: str, answer: str, cell_id: str | None = None, status: str = "complete") -> Turn:
    return Turn(prompt, QwenResult(text=answer, model="qwen-plus", usage=Usage(10, 5), status=status), cell_id)


def test_the_file_is_private_in_wal_mode_and_versioned(tmp_path) -> None:
    store = Store(tmp_path / "data" / "history.sqlite3")
    store.save_turn("nb.ipynb", "default", 1, "c1", turn("q", "a", "c1").to_record())
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    wal = store.path.with_name(store.path.name + "-wal")
    assert not wal.exists() or stat.S_IMODE(os.stat(wal).st_mode) == 0o600


def test_a_newer_schema_is_refused_not_damaged(tmp_path) -> None:
    path = tmp_path / "history.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer qwen_magic"):
        Store(path)


def test_turns_replace_by_cell_and_by_position(tmp_path) -> None:
    store = Store(tmp_path / "h.sqlite3")
    store.save_turn("nb", "default", 1, "c1", turn("first", "1", "c1").to_record())
    store.save_turn("nb", "default", 2, "c2", turn("second", "2", "c2").to_record())
    store.save_turn("nb", "default", 1, "c1", turn("first again", "1b", "c1").to_record())
    assert [r["prompt"] for r in store.turns("nb", "default")] == ["first again", "second"]
    store.delete_position("nb", "default", 2)
    assert [r["prompt"] for r in store.turns("nb", "default")] == ["first again"]
    assert store.turns("other.ipynb", "default") == []
    store.delete_chat("nb", "default")
    assert store.turns("nb", "default") == []


def test_a_call_and_its_turn_are_written_together_or_not_at_all(tmp_path) -> None:
    store = Store(tmp_path / "h.sqlite3")
    other = sqlite3.connect(store.path)
    with store.transaction():
        store.add_call("nb", "default", "qwen-plus", 10, 5, 0.001, "complete")
        store.save_turn("nb", "default", 1, "c1", turn("q", "a", "c1").to_record())
        # Inside the outer transaction nothing is committed yet: another reader sees neither.
        assert other.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 0
    assert other.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1
    assert [r["prompt"] for r in store.turns("nb", "default")] == ["q"]

    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_call("nb", "default", "qwen-plus", 10, 5, 0.001, "complete")
            store.save_turn("nb", "default", 2, "c2", turn("q2", "a2", "c2").to_record())
            raise RuntimeError("the kernel stopped half-way")
    assert other.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1
    assert [r["prompt"] for r in store.turns("nb", "default")] == ["q"]
    store.add_call("nb", None, "qwen-plus", 1, 1, None, "failed")  # and the store still writes
    assert other.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 2


def test_records_round_trip_into_turns() -> None:
    original = Turn("q?", QwenResult(text="a.", model="qwen-max", usage=Usage(3, 4, 1, 2), cost=0.5,
                                     status=INTERRUPTED, chat="c", turn=2), "cell-9", "be brief")
    again = Turn.from_record(original.to_record())
    assert (again.prompt, again.cell_id, again.system) == ("q?", "cell-9", "be brief")
    assert again.result.usage == Usage(3, 4, 1, 2) and again.result.cost == 0.5
    assert again.result.status == INTERRUPTED and again.result.text == "a."


def test_context_is_the_turns_before_the_cell_and_skips_failures() -> None:
    chat = Chat()
    for cell in ("a", "b", "c"):
        chat.record(turn(f"q{cell}", f"a{cell}", cell))
    assert [t.prompt for t in chat.context_for("b")] == ["qa"]
    assert [t.prompt for t in chat.context_for(None)] == ["qa", "qb", "qc"]
    assert chat.record(turn("qb2", "ab2", "b")) == 2  # replaced in place
    assert [t.prompt for t in chat.turns] == ["qa", "qb2", "qc"]
    chat.record(turn("qd", "", "d", status=FAILED))
    chat.record(turn("qe", "partial", "e", status=INTERRUPTED))
    assert [t.prompt for t in chat.context_for(None)] == ["qa", "qb2", "qc", "qe"]


def test_the_window_leaves_out_the_oldest_turns_and_says_why() -> None:
    context = [turn(f"question {n} " * 20, f"answer {n} " * 20) for n in range(10)]
    each = context[0].tokens()
    window = fit_window(context, fixed_tokens=100, input_limit=100 + 3 * each + 1, max_turns=None,
                        max_history_tokens=None, model_name="qwen-max")
    assert [t.prompt for t in window.turns] == [t.prompt for t in context[-3:]]
    assert window.left_out == 7
    assert window.note() == "7 oldest turns of the chat left out of the request (qwen-max's input limit of " \
                            f"{100 + 3 * each + 1:,} tokens)."
    by_count = fit_window(context, fixed_tokens=0, input_limit=None, max_turns=4, max_history_tokens=None,
                          model_name="m")
    assert len(by_count.turns) == 4 and "--max-history 4" in by_count.note()
    by_tokens = fit_window(context, fixed_tokens=0, input_limit=None, max_turns=None,
                           max_history_tokens=2 * each, model_name="m")
    assert len(by_tokens.turns) == 2 and "max_history_tokens" in by_tokens.note()
    nothing_left_out = fit_window(context, fixed_tokens=0, input_limit=10**6, max_turns=None,
                                  max_history_tokens=None, model_name="m")
    assert nothing_left_out.left_out == 0 and nothing_left_out.note() is None


def test_messages_put_system_history_and_question_in_order() -> None:
    messages = messages_for("sys", [turn("q1", "a1")], "q2")
    assert messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
