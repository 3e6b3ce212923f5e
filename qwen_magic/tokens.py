"""Local token counting with the Qwen tokenizer that dashscope bundles.

The server bills the chat template, not just the text: every message renders as
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and the reply is primed with
``<|im_start|>assistant\\n``; with no system message the server inserts its default one.
Counting the same way is what makes a local estimate match ``usage.input_tokens``.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# <|im_start|> and <|im_end|> are one token each, plus the "\n" after <|im_end|>.
_MESSAGE_SPECIAL_TOKENS = 3
_load_lock = threading.Lock()
# The tokenizer's regex recurses along a run of white space and fails on one of ~1M
# characters; runs this long are counted in pieces of this size (a token or so off per
# piece, and text without such runs is counted exactly as before).
_PIECE = 4096
# Tried only where a run starts (the look-behind): tried at every position inside a run, the
# search would take quadratic time on text with many runs just under the limit.
_LONG_SPACE_RUN = re.compile(r"(?<!\s)\s{%d,}" % _PIECE)


@functools.lru_cache(maxsize=1)
def _encoding() -> "tiktoken.Encoding":
    """The one tiktoken encoding of the process (loading it takes ~0.3 s)."""
    with _load_lock:
        from dashscope import get_tokenizer

        return get_tokenizer("qwen-plus")._tokenizer


def count_text(text: str) -> int:
    """Tokens of plain text; special-token markup in it counts as ordinary text. Never raises."""
    if not text:
        return 0
    try:
        normalized = unicodedata.normalize("NFC", text)
    except UnicodeError:
        normalized = text
    if len(normalized) < _PIECE:
        return _count(normalized)
    total = start = 0
    for run in _LONG_SPACE_RUN.finditer(normalized):
        total += _count(normalized[start:run.start()])
        total += sum(_count(run.group()[i:i + _PIECE]) for i in range(0, len(run.group()), _PIECE))
        start = run.end()
    return total + _count(normalized[start:])


def _count(text: str) -> int:
    if not text:
        return 0
    encoding = _encoding()
    try:
        return len(encoding.encode(text, allowed_special=set(), disallowed_special=()))
    except UnicodeEncodeError:  # a lone surrogate: counted as the replacement the answer shows
        from .client import mend

        return _count(mend(text))
    except ValueError:  # the tokenizer's regex gave up on some other pathological run
        if len(text) <= _PIECE:
            return len(text.encode("utf-8", "replace")) // 2 + 1  # a bound, not a count
        return sum(_count(text[i:i + _PIECE]) for i in range(0, len(text), _PIECE))


@functools.lru_cache(maxsize=65536)
def count_message(role: str, content: str) -> int:
    """Tokens of one rendered chat message, template included (cached: history repeats)."""
    return _MESSAGE_SPECIAL_TOKENS + count_text(f"{role}\n{content}")


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


def count_chat_input(messages: Iterable[Mapping[str, Any]], *, extra_tokens: int = 0) -> int:
    """Input tokens the server will bill for ``messages`` (chat template included).

    ``extra_tokens`` covers model-specific additions such as the empty think block of
    Qwen3-based models in non-thinking mode.
    """
    messages = list(messages)
    total = 0
    if not any(message.get("role") == "system" for message in messages):
        total += count_message("system", DEFAULT_SYSTEM_PROMPT)
    for message in messages:
        total += count_message(str(message.get("role", "user")), _text_of(message.get("content")))
    # The reply is primed with "<|im_start|>assistant\n".
    total += 1 + count_text("assistant\n")
    return total + extra_tokens
