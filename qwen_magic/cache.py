"""``--cache``: mark a chat's stable prefix for DashScope's explicit context cache.

The prefix (the system prompt and the earlier turns) is sent with ``cache_control:
{"type": "ephemeral"}`` on a text block, in both protocols; the service writes the prefix
up to a marker to the cache (billed at 125% of the input price) and later requests that
begin with the same marked prefix read it back at 10%. Markers go on the system prompt, on
the end of the previous request's prefix (so that it is read back) and on the end of this
one's (so that the next cell reads it): at most 3 of the 4 the service allows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from IPython.core.error import UsageError

from .catalog import Catalog, ModelInfo
from .i18n import _

MAX_MARKERS = 4
# The service caches a marked prefix only from this many tokens on.
MIN_CACHED_PREFIX = 1024
EPHEMERAL = {"type": "ephemeral"}


def check_explicit_cache(model_name: str, model: ModelInfo | None, catalog: Catalog) -> None:
    """One line refusing --cache on a model without explicit cache."""
    if model is not None and model.explicit_cache:
        return
    able = ", ".join(sorted(m.name for m in catalog.models.values() if m.explicit_cache and not m.retired))
    raise UsageError(_("--cache: {model} has no explicit context cache (models that have it: {models}); "
                       "drop --cache (the implicit cache, where the model has it, works without it).").format(
        model=model_name, models=able))


def marked_positions(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Which messages carry a marker: the system prompt and the last two turns' ends before the question."""
    prefix_end = len(messages) - 1  # the last message is the new question: not stable
    if prefix_end <= 0:
        return []
    positions = []
    if messages[0].get("role") == "system":
        positions.append(0)
    assistants = [i for i in range(prefix_end) if messages[i].get("role") == "assistant"]
    for index in assistants[-2:]:
        if index not in positions:
            positions.append(index)
    if prefix_end - 1 not in positions:  # a prefix that ends otherwise (no answer yet)
        positions.append(prefix_end - 1)
    return sorted(positions)[-MAX_MARKERS:]


def with_cache_markers(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their stable prefix marked (content as a list of text blocks)."""
    marked = [dict(message) for message in messages]
    for index in marked_positions(messages):
        marked[index]["content"] = _marked_content(marked[index]["content"])
    return marked


def _marked_content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content, "cache_control": dict(EPHEMERAL)}]
    blocks = [dict(part) for part in content]
    for block in reversed(blocks):  # the marker goes on the last text block
        if block.get("type", "text") == "text" or "text" in block:
            block["cache_control"] = dict(EPHEMERAL)
            break
    return blocks


def prefix_end(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many messages the marked prefix holds (0: none is marked)."""
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index].get("content")
        if isinstance(content, list) and any(isinstance(b, Mapping) and b.get("cache_control") for b in content):
            return index + 1
    return 0
