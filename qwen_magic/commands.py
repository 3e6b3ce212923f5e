"""The ``%qwen`` line magic's subcommands."""

from __future__ import annotations

import getpass
import html
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.error import UsageError

from .client import key_source, mask_key

if TYPE_CHECKING:  # pragma: no cover
    from .magics import QwenMagic


@dataclass(frozen=True)
class Table:
    """Rows of (name, value): aligned text in a terminal, an HTML table in a notebook."""

    title: str
    rows: tuple[tuple[str, str], ...]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        width = max((len(name) for name, _ in self.rows), default=0)
        lines = [self.title] + [f"  {name.ljust(width)}  {value}" for name, value in self.rows]
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td style='text-align:left'><code>{html.escape(name)}</code></td>"
            f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
            for name, value in self.rows
        )
        return f"<strong>{html.escape(self.title)}</strong><table>{body}</table>"


HELP = Table(
    "%qwen commands",
    (
        ("%%qwen [options]", "ask the model the cell's text (%%qwen? lists the options)"),
        ("%qwen config", "the effective settings, the key masked"),
        ("%qwen login", "type the API key at a hidden prompt; kept in memory for this session"),
        ("%qwen help", "this list"),
    ),
)


def _help(magics: "QwenMagic", args: list[str]) -> Table:
    return HELP


def _config(magics: "QwenMagic", args: list[str]) -> Table:
    settings = magics.settings()
    connection = magics.session.connection(settings)
    client = magics.session.client
    key, source = key_source(magics.session.session_key)
    timeout = client.sdk_client(connection).config.timeout
    rows = (
        ("model", settings.model),
        ("system", settings.system or "(the model's default)"),
        ("display", settings.display),
        ("protocol", settings.protocol),
        ("base_url", client.resolved_base_url(connection)),
        ("timeout", f"{timeout:g} s"),
        ("api key", f"{mask_key(key)} ({source})"),
    )
    return Table("qwen_magic settings (change with %config QwenMagic.<name> = ...)", rows)


def _login(magics: "QwenMagic", args: list[str]) -> None:
    if args:
        raise UsageError("%qwen login takes no argument: it asks for the key at a hidden prompt.")
    key = getpass.getpass("DashScope API key (kept in memory for this session only): ").strip()
    if not key:
        raise UsageError("No key entered; nothing changed.")
    magics.session.session_key = key
    print(f"Key {mask_key(key)} set for this session. It is not saved anywhere.")


COMMANDS: dict[str, Callable[["QwenMagic", list[str]], Any]] = {
    "help": _help,
    "config": _config,
    "login": _login,
}


def run_command(magics: "QwenMagic", line: str) -> Any:
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise UsageError(f"%qwen: {error}") from None
    if not words:
        return HELP
    name, args = words[0], words[1:]
    command = COMMANDS.get(name)
    if command is None:
        raise UsageError(f"%qwen has no command {name!r}; try one of: {', '.join(COMMANDS)}.")
    return command(magics, args)
