"""``--file PATH``: a text file as a labelled block before the question.

A relative path (and ``~``) is read as the user's own code reads it: from the kernel's
working directory, which Jupyter sets to the notebook's folder. Only regular files on a real
file system are read (a symlink is followed to what it names). A CSV or JSON Lines file larger
than the value limit is summarised; a PDF is sent as its text when pypdf is installed; a
binary file, a folder, or a file over the model's input limit is refused with one line.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import stat
from collections import deque
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from .context import fenced
from .i18n import N_, _
from .values import WHOLE_TABLE_ROWS, Rendered, Table, cut, summarise_table

MAX_FILE_BYTES = 64 * 1024 * 1024  # read whole at most; a larger CSV or JSONL is streamed
MAX_STREAMED_BYTES = 2 * 1024 * 1024 * 1024
_SNIFF = 8192
_LANGUAGES = {
    ".py": "python", ".md": "markdown", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".sql": "sql",
    ".js": "javascript", ".ts": "typescript", ".html": "html", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".sh": "bash", ".txt": "text", ".log": "text", ".jsonl": "json", ".ipynb": "json",
}
SUMMARISED_FILE = N_("--file {path} was summarised ({summary}).")


def file_block(path_text: str, *, max_input: int | None, model_name: str, value_tokens: int) -> tuple[str, str | None]:
    """The file's labelled block, and a note when it was summarised."""
    path = _regular_file(path_text)
    size = path.stat().st_size
    suffix = path.suffix.lower()
    with open(path, "rb") as file:
        start = file.read(_SNIFF)
    if start.startswith(b"%PDF-"):
        text = _pdf_text(path, path_text)
    elif suffix in (".csv", ".tsv", ".jsonl", ".ndjson") and size > value_tokens:
        encoding = _encoding(start, path_text)
        if size > MAX_STREAMED_BYTES:
            raise UsageError(_("--file {path}: {size:.1f} GB is too large to read; nothing was sent.").format(
                path=path_text, size=size / 1024**3))
        summary = _jsonl_summary(path, encoding, value_tokens) if suffix in (".jsonl", ".ndjson") \
            else _csv_summary(path, encoding, value_tokens, "\t" if suffix == ".tsv" else ",")
        if summary.summary is not None:
            return (f"File {path_text}, summarised:\n\n{summary.text}",
                    _(SUMMARISED_FILE).format(path=path_text, summary=summary.summary))
        text = path.read_text(encoding=encoding, errors="replace")
    else:
        encoding = _encoding(start, path_text)
        limit_bytes = MAX_FILE_BYTES if max_input is None else min(MAX_FILE_BYTES, max_input * 16)
        if size > limit_bytes:
            _refuse_size(path_text, size // 4, max_input, model_name)
        text = path.read_bytes().decode(encoding, errors="replace")
    if max_input is not None:
        from .tokens import count_text

        tokens = count_text(text)
        if tokens > max_input:
            _refuse_size(path_text, tokens, max_input, model_name)
    return f"File {path_text}:\n\n{fenced(text, _LANGUAGES.get(suffix, ''))}", None


def _refuse_size(path_text: str, tokens: int, max_input: int | None, model_name: str) -> None:
    if max_input:
        raise UsageError(_("--file {path}: about {tokens:,} tokens, over {model}'s input limit of {limit:,}; "
                           "nothing was sent.").format(path=path_text, tokens=tokens, model=model_name, limit=max_input))
    raise UsageError(_("--file {path}: about {tokens:,} tokens, over what can be read; nothing was sent.").format(
        path=path_text, tokens=tokens))


def _regular_file(path_text: str) -> Path:
    """The file named, resolved from the notebook's folder; one line if it cannot be sent."""
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = Path(os.getcwd()) / path
    try:
        resolved = path.resolve(strict=True)
        mode = resolved.stat().st_mode
    except (OSError, RuntimeError, ValueError):  # missing, a broken or looping link, a NUL in the name
        shown = path_text if path_text.isprintable() else repr(path_text)
        raise UsageError(_("--file {path}: no such file (relative paths are read from {folder}).").format(
            path=shown, folder=os.getcwd())) from None
    if stat.S_ISDIR(mode):
        raise UsageError(_("--file {path}: a folder, not a file; name the files to send.").format(path=path_text))
    # /proc and /sys hold "regular" files that are views of the process (its environment among them).
    if not stat.S_ISREG(mode) or resolved.parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise UsageError(_("--file {path}: not a regular file; nothing was sent.").format(path=path_text))
    if not os.access(resolved, os.R_OK):
        raise UsageError(_("--file {path}: cannot be read (permission denied).").format(path=path_text))
    return resolved


def _encoding(start: bytes, path_text: str) -> str:
    """UTF-8 (with or without a BOM), else GB 18030; a file with NUL bytes is binary."""
    binary = _("--file {path}: not a text file (its content is binary); nothing was sent.")
    if b"\x00" in start:
        raise UsageError(binary.format(path=path_text))
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            # The sniffed bytes may end inside a character: an incomplete last one is no error.
            codecs.getincrementaldecoder(encoding)().decode(start, final=len(start) < _SNIFF)
            return encoding
        except UnicodeDecodeError:
            continue
    raise UsageError(binary.format(path=path_text))


def _pdf_text(path: Path, path_text: str) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise UsageError(_("--file {path}: a PDF; install pypdf (pip install pypdf) to send its text.").format(
            path=path_text)) from None
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as error:  # a damaged or encrypted PDF
        raise UsageError(_("--file {path}: its text cannot be read ({reason}).").format(
            path=path_text, reason=type(error).__name__)) from None
    return "\n\n".join(f"[page {number}]\n{text.strip()}" for number, text in enumerate(pages, start=1))


def _csv_summary(path: Path, encoding: str, value_tokens: int, delimiter: str) -> Rendered:
    first: list[list[str]] = []
    last: deque[list[str]] = deque(maxlen=5)
    rows = 0
    with open(path, encoding=encoding, errors="replace", newline="") as file:
        reader = csv.reader(file, delimiter=delimiter)
        header = next(reader, [])
        for row in reader:
            rows += 1
            if len(first) < WHOLE_TABLE_ROWS:
                first.append(row)
            last.append(row)
    width = len(header)
    sample = first[:20] + list(last)
    dtypes = [_column_type([row[i] for row in sample if i < len(row)]) for i in range(width)]

    def padded(part: list[list[str]]) -> list[list[Any]]:
        return [(row + [""] * width)[:width] for row in part]

    table = Table(N_("CSV file"), rows, header, dtypes, lambda n: padded(first[:n]),
                  lambda n: padded(list(last)[-n:] if n else []), None)
    return summarise_table(table, value_tokens)


def _column_type(values: list[str]) -> str:
    present = [value for value in values if value.strip()]
    for kind, convert in (("int", int), ("float", float)):
        try:
            for value in present:
                convert(value)
            return kind if present else "empty"
        except ValueError:
            continue
    return "text"


def _jsonl_summary(path: Path, encoding: str, value_tokens: int) -> Rendered:
    first: list[str] = []
    last: deque[str] = deque(maxlen=5)
    records = 0
    keys: list[str] = []
    with open(path, encoding=encoding, errors="replace") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            records += 1
            if records == 1:
                try:
                    parsed = json.loads(line)
                    keys = [str(key) for key in parsed] if isinstance(parsed, dict) else []
                except ValueError:
                    keys = []
            if len(first) < 5:
                first.append(line[:300])
            last.append(line[:300])
    shown = first if records <= 10 else first + [f"… ({records - 10:,} records not shown)"] + list(last)
    head = f"JSON Lines file: {records:,} records" + (f"; keys of the first: {', '.join(keys)}" if keys else "")
    text = cut("\n".join([head, *shown]), value_tokens).text
    if records <= 10:
        summary = _("a JSON Lines file of {count:,} records: each record cut to 300 characters")
    else:
        summary = _("a JSON Lines file of {count:,} records: the first and last 5 records")
    return Rendered(text, summary.format(count=records))
