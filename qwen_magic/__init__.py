"""qwen_magic: ``%%qwen`` for IPython and Jupyter.

``%load_ext qwen_magic`` registers the ``%%qwen`` cell magic and the ``%qwen`` line magic.
Loading stays fast: dashscope, the tokenizer and ipywidgets are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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
