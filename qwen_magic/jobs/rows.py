"""A collection becomes rows: one request each, its prompt filled, its content digested.

``{item}`` is the element and ``{index}`` its position (0-based), or its key in a dict or
a pandas index; the notebook's other variables fill as in any cell. A row's digest is the
request it makes (system prompt, messages): the history keys a row's result by it, so a row
moved, or shared with another run of the same job, keeps its answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError

from ..client import mend
from ..conversation import messages_for
from ..formats import question, with_json_hint
from ..i18n import _
from ..prompt import filler

# The names a row adds to the notebook's variables while its prompt is filled.
ROW_NAMES = ("item", "index")
_MENTIONS_ROW = re.compile(r"\{(?:item|index)(?![A-Za-z0-9_])")


@dataclass(frozen=True)
class Row:
    """One element of the collection, as the request it makes."""

    position: int
    key: Any
    messages: tuple[Mapping[str, Any], ...]
    digest: str

    @property
    def prompt(self) -> str:
        """The filled prompt (the user message's text)."""
        content = self.messages[-1]["content"]
        if isinstance(content, str):
            return content
        return " ".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


@dataclass(frozen=True)
class Collection:
    """The elements with their keys, and the pandas index to give results back with."""

    name: str
    pairs: list[tuple[Any, Any]]
    index: Any = None


def collection_of(name: str, value: Any) -> Collection:
    """The (key, element) pairs of a list, tuple, dict, pandas Series or DataFrame, or sized iterable."""
    kind = type(value).__module__.split(".", 1)[0]
    if kind == "pandas" and hasattr(value, "iterrows"):  # a DataFrame: one row at a time, as a Series
        return Collection(name, list(value.iterrows()), value.index)
    if kind == "pandas" and hasattr(value, "items") and hasattr(value, "index"):  # a Series
        return Collection(name, list(value.items()), value.index)
    if isinstance(value, (str, bytes, bytearray)):
        raise UsageError(_("--map {name}: {name} is one string, not a collection of rows; put it in a list.").format(
            name=name))
    if isinstance(value, Mapping):
        return Collection(name, list(value.items()))
    if not isinstance(value, Iterable):
        raise UsageError(_("--map {name}: a {kind} is not a collection: give a list, tuple, dict, pandas Series or "
                           "DataFrame.").format(name=name, kind=type(value).__name__))
    if not isinstance(value, Sized):
        raise UsageError(_("--map {name}: {name} has no length (a generator?): it would be used up by the first "
                           "run; make it a list first ({name} = list({name})).").format(name=name))
    return Collection(name, list(enumerate(value)))


def check_template(template: str, images: tuple[str, ...]) -> None:
    """A template that names no row would ask every row the same question."""
    if not _MENTIONS_ROW.search(template) and not any(_MENTIONS_ROW.search(image) for image in images):
        # Translators: {item} and {index} are written as they are, not filled in.
        raise UsageError(_("--map: the prompt has no {item} (or {index}): every row would ask the same question. "
                           "Write {item} where each row's value goes."))


def build_rows(
    template: str,
    collection: Collection,
    namespace: Mapping[str, Any],
    *,
    system: str | None,
    fmt: str,
    images: tuple[str, ...] = (),
) -> list[Row]:
    """Every row's request, filled from its element and the notebook's variables."""
    try:  # the references to the notebook's other variables are filled once
        fill_prompt = filler(template, namespace, ROW_NAMES)
        fill_images = [filler(image, namespace, ROW_NAMES) for image in images]
    except UsageError as error:
        raise UsageError(_("--map {name}: {error}").format(name=collection.name, error=error)) from None
    rows = []
    for position, (key, item) in enumerate(collection.pairs):
        names = {"item": item, "index": key}
        try:
            prompt = mend(fill_prompt(names))
            row_images = tuple(fill_image(names) for fill_image in fill_images)
        except UsageError as error:
            raise UsageError(_("--map {name}, row {key}: {error}").format(name=collection.name, key=_shown_key(key),
                                                                          error=error)) from None
        request_system = with_json_hint(system, prompt) if fmt == "json" else system
        if request_system is None and not row_images:  # the usual row, built directly (50,000 of them)
            messages: tuple[Mapping[str, Any], ...] = ({"role": "user", "content": prompt},)
        else:
            messages = tuple(messages_for(request_system, [], question(prompt, row_images)))
        rows.append(Row(position, key, messages, digest_of(messages)))
    return rows


def digest_of(messages: Iterable[Mapping[str, Any]]) -> str:
    """The row's identity in the history: what it asks, byte for byte."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):  # images and text parts
            content = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        digest.update(f"{message['role']}\x00{content}\x1e".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _shown_key(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:39] + "…"
