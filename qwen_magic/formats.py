"""What a cell asks beyond plain chat: answer formats, images, thinking, other servers.

Each piece turns an option into part of the request before it is sent, or into part of
the result after the answer ends; the engine's flow stays the same for all of them.
"""

from __future__ import annotations

import base64
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from .catalog import Catalog, ModelInfo
from .i18n import _
from .result import QUIET_STYLE
from .markdown import escape, render_markdown

# Sent to the model (not shown), so in English whatever the language.
JSON_HINT = "Answer with one JSON object only."
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # DashScope's limit for an image sent inline
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


# ---- before sending

def check_capabilities(model_name: str, model: ModelInfo | None, catalog: Catalog, *,
                       thinking: bool, images: bool) -> None:
    """Refuse what the catalog says the model cannot do; unknown models are let through."""
    if model is None:
        return
    if thinking and model.thinking == "none":
        able = sorted(m.name for m in catalog.models.values() if m.thinking != "none" and not m.retired)
        raise UsageError(_("{model} has no thinking mode; models that do: {models}.").format(
            model=model_name, models=", ".join(able)))
    if images and not model.vision:
        raise UsageError(_("{model} reads text only; --image needs a vision model: {models}.").format(
            model=model_name, models=", ".join(sorted(catalog.vision_models()))))


def with_json_hint(system: str | None, prompt: str) -> str | None:
    """JSON mode needs the word JSON in the prompt; add a line to the system prompt if absent."""
    if "json" in prompt.lower() or (system and "json" in system.lower()):
        return system
    return f"{system}\n\n{JSON_HINT}" if system else JSON_HINT


def image_part(source: str) -> dict[str, str]:
    """A URL as is; a local file inline as a data: URL (nothing is uploaded anywhere)."""
    if source.startswith(("http://", "https://", "data:", "oss://")):
        return {"type": "image", "url": source}
    data = _image_bytes(source)
    kind = image_type(data)
    if kind is None:
        raise UsageError(_(
            "--image {source}: not an image (its content is not PNG, JPEG, GIF, WebP, BMP or TIFF); nothing was sent."
        ).format(source=source))
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "image", "url": f"data:{kind};base64,{encoded}"}


def _image_bytes(source: str) -> bytes:
    """A local image's bytes: a regular file (symlinks followed), at most 10 MB, read once."""
    path = Path(source).expanduser()
    try:
        resolved = path.resolve(strict=True)
        mode = resolved.stat().st_mode
    except (OSError, RuntimeError):  # missing, a broken or looping link, no permission
        raise UsageError(_("--image {source}: no such file, and not an http(s) URL.").format(source=source)) from None
    # /proc and /sys hold "regular" files that are views of the process (its environment,
    # the key among it): only a file on a real file system is read.
    if not stat.S_ISREG(mode) or resolved.parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise UsageError(_("--image {source}: not a regular file; nothing was sent.").format(source=source))
    try:
        with open(resolved, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        raise UsageError(_("--image {source}: cannot be read ({reason}).").format(
            source=source, reason=error.strerror or error)) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise UsageError(_("--image {source}: over the 10 MB an image may be.").format(source=source))
    return data


def image_type(data: bytes) -> str | None:
    """The image's MIME type from its first bytes (its name may say anything), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM") and len(data) >= 26:
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def question(prompt: str, images: tuple[str, ...]) -> str | list[dict[str, str]]:
    """The user message's content: text, or the images then the text (a vision request)."""
    if not images:
        return prompt
    return [*(image_part(source) for source in images), {"type": "text", "text": prompt}]


def protocol_for(protocol: str | None, base_url: str | None, default: str) -> str:
    """An explicit protocol; else DashScope's native API for an /api/v1 URL; else compatible mode."""
    if protocol:
        return protocol
    if base_url:
        return "native" if base_url.rstrip("/").endswith("/api/v1") else "openai"
    return default


# ---- after the answer

@dataclass(frozen=True)
class Parsed:
    """What a format made of the answer: a value for -o, and an error line if it failed."""

    value: Any = None
    code: str | None = None
    error: str | None = None


def parse_answer(fmt: str, text: str) -> Parsed:
    if fmt == "json":
        return _parse_json(text)
    if fmt == "code":
        return Parsed(code=extract_code(text))
    return Parsed()


def _parse_json(text: str) -> Parsed:
    candidate = text.strip()
    fenced = _FENCE.search(candidate)
    if fenced and not candidate.startswith(("{", "[")):
        candidate = fenced.group(1).strip()
    try:
        return Parsed(value=json.loads(candidate))
    except json.JSONDecodeError as error:
        return Parsed(error=_("the answer is not valid JSON ({problem} at line {line} column {column})").format(
            problem=error.msg, line=error.lineno, column=error.colno))


def extract_code(text: str) -> str | None:
    """The answer's first fenced code block, without its fences."""
    match = _FENCE.search(text)
    return match.group(1).rstrip("\n") if match else None


def answer_markdown(fmt: str, text: str, parsed: Parsed) -> str:
    """The answer as Markdown for a saved notebook, by format."""
    if fmt == "text":
        return f"```text\n{text}\n```" if text else ""
    if fmt == "json" and parsed.error is None and text:
        return f"```json\n{json.dumps(parsed.value, ensure_ascii=False, indent=2)}\n```"
    if fmt == "json":
        return f"```text\n{text}\n```" if text else ""
    return text


def preformatted(text: str) -> str:
    """Plain text, escaped, as it is (for -f text, and for JSON while it streams)."""
    return f'<pre style="white-space: pre-wrap">{escape(text)}</pre>' if text else ""


def answer_html(fmt: str, text: str, parsed: Parsed) -> str:
    """The answer as safe HTML, by format."""
    if fmt == "text" or (fmt == "json" and parsed.error is not None):
        return preformatted(text)
    if fmt == "json":
        return json_tree(parsed.value)
    return render_markdown(text)


def json_tree(value: Any, key: str | None = None, depth: int = 0) -> str:
    """A collapsible tree: objects and arrays as <details>, open at the first two levels."""
    label = f"<code>{escape(key)}</code>: " if key is not None else ""
    if isinstance(value, dict) or isinstance(value, list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        brackets = "{}" if isinstance(value, dict) else "[]"
        inner = "".join(
            f'<li style="list-style: none">{json_tree(child, str(name), depth + 1)}</li>' for name, child in items
        )
        opened = " open" if depth < 2 else ""
        return (f"<details{opened}><summary>{label}{brackets[0]}…{brackets[1]} "
                f"<small>({len(value)})</small></summary><ul style=\"margin: 0\">{inner}</ul></details>")
    return f"{label}<code>{escape(json.dumps(value, ensure_ascii=False))}</code>"


def reasoning_markdown(reasoning: str) -> str:
    """Thinking, as a quoted block above the answer."""
    quoted = "\n".join(f"> {line}" if line else ">" for line in reasoning.splitlines())
    heading = _("Thinking")
    return f"> **{heading}**\n>\n{quoted}\n\n"


def reasoning_html(reasoning: str, *, opened: bool, tokens: int | None = None) -> str:
    heading = _("Thinking ({tokens:,} tokens)").format(tokens=tokens) if tokens else _("Thinking")
    return (
        f'<details class="qwen-thinking"{" open" if opened else ""}><summary>{escape(heading)}</summary>'
        f'<div style="white-space: pre-wrap; {QUIET_STYLE}">{escape(reasoning)}</div>'
        "</details>"
    )


def sources_markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for number, result in enumerate(results, start=1):
        title = (result.get("title") or result.get("site_name") or result.get("url") or _("source")).replace("]", ")")
        url = result.get("url") or ""
        lines.append(f"{number}. [{title}]({url})" if url.startswith(("http://", "https://")) else f"{number}. {title}")
    heading = _("Sources")
    return f"**{heading}**\n\n" + "\n".join(lines) if lines else ""
