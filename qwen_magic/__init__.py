"""qwen_magic: ``%%qwen`` for IPython and Jupyter.

``%load_ext qwen_magic`` registers the ``%%qwen`` cell magic and the ``%qwen`` line magic.
Loading stays fast: dashscope, the tokenizer and ipywidgets are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from IPython.core.interactiveshell import InteractiveShell

_registered: dict[int, object] = {}


def load_ipython_extension(shell: "InteractiveShell") -> None:
    """Register the magics once per shell; loading again is harmless."""
    if id(shell) in _registered:
        return
    from .magics import QwenMagic

    magics = QwenMagic(shell=shell)
    shell.register_magics(magics)
    _registered[id(shell)] = magics
    offline = os.environ.get("QWEN_MAGIC_OFFLINE_GATEWAY")
    if offline:  # set by `qwen-magic demo` when there is no key
        print(
            f"Offline demo: answers come from the qwen_magic offline gateway at {offline}, not from a model; "
            "nothing is billed.\n离线演示：回答来自 qwen_magic 离线网关，不是真实模型，不产生任何费用。"
        )


def map(template: str, items: Any, *, model: str | None = None, system: str | None = None,
        temperature: float | None = None, max_tokens: int | None = None, format: str | None = None,
        thinking: bool = False, concurrency: int | None = None, fresh: bool = False,
        max_cost: float | None = None, dry_run: bool = False) -> Any:
    """``%%qwen --map`` from code: ask ``template`` once per element of ``items``.

    ``{item}`` is the element and ``{index}`` its position or key; the notebook's variables
    fill as in a cell. Returns a ``MapResult`` aligned with ``items`` (``.texts``, ``.values``,
    ``.failed``, ``.to_series()``), or the dry run's figures. In IPython the job shares the
    session of ``%%qwen``: its settings, rate limits, budget and ledger.
    """
    from .jobs.job import map_from_code

    return map_from_code(template, items, model=model, system=system, temperature=temperature,
                         max_tokens=max_tokens, format=format, thinking=thinking, concurrency=concurrency,
                         fresh=fresh, max_cost=max_cost, dry_run=dry_run)


def unload_ipython_extension(shell: "InteractiveShell") -> None:
    """Remove ``%%qwen`` and ``%qwen`` and release the client's connections."""
    magics = _registered.pop(id(shell), None)
    if magics is None:
        return
    for kind in ("line", "cell"):
        shell.magics_manager.magics[kind].pop("qwen", None)
    shell.magics_manager.registry.pop(type(magics).__name__, None)
    close = getattr(magics, "close", None)
    if close is not None:
        close()
