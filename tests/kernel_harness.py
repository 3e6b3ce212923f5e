"""A real IPython kernel driven over jupyter_client, seen as a front end sees it.

``execute`` sends an execute request (with ``metadata.cellId`` when given, as JupyterLab
does), records every IOPub message with its arrival time, and rebuilds the cell's outputs
the way a front end would: ``update_display_data`` replaces the output with the same
display id, widget comms are tracked by model id.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq
from jupyter_client.manager import KernelManager


@dataclass
class Message:
    received: float
    msg_type: str
    content: dict[str, Any]
    metadata: dict[str, Any]
    size: int  # bytes of the whole message as JSON, envelope included
    content_size: int  # bytes of its content alone


@dataclass
class Execution:
    reply: dict[str, Any]
    messages: list[Message] = field(default_factory=list)
    started: float = 0.0
    stdin_prompts: list[str] = field(default_factory=list)
    stdin_hidden: list[bool] = field(default_factory=list)  # was each prompt a password prompt

    @property
    def status(self) -> str:
        return self.reply["status"]

    def of_type(self, *types: str) -> list[Message]:
        return [m for m in self.messages if m.msg_type in types]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The cell's final outputs, display updates applied."""
        outputs: list[dict[str, Any]] = []
        by_display_id: dict[str, list[int]] = {}
        for message in self.messages:
            content = message.content
            if message.msg_type in ("display_data", "execute_result"):
                output = {"output_type": message.msg_type, "data": content["data"],
                          "metadata": content.get("metadata", {})}
                display_id = content.get("transient", {}).get("display_id")
                if display_id:
                    by_display_id.setdefault(display_id, []).append(len(outputs))
                outputs.append(output)
            elif message.msg_type == "update_display_data":
                display_id = content.get("transient", {}).get("display_id")
                for index in by_display_id.get(display_id, []):
                    outputs[index] = {"output_type": "display_data", "data": content["data"],
                                      "metadata": content.get("metadata", {})}
            elif message.msg_type == "stream":
                if outputs and outputs[-1]["output_type"] == "stream" and outputs[-1]["name"] == content["name"]:
                    outputs[-1]["text"] += content["text"]
                else:
                    outputs.append({"output_type": "stream", "name": content["name"], "text": content["text"]})
            elif message.msg_type == "error":
                outputs.append({"output_type": "error", **content})
            elif message.msg_type == "clear_output":
                outputs.clear()
                by_display_id.clear()
        return outputs

    @property
    def stdout(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["output_type"] == "stream" and o["name"] == "stdout")

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [o for o in self.outputs if o["output_type"] == "error"]
        return errors[-1] if errors else None

    def widget_value_updates(self) -> list[tuple[float, str]]:
        """(arrival time, value) of every HTML widget value the front end received."""
        updates = []
        for message in self.of_type("comm_open", "comm_msg"):
            state = message.content.get("data", {}).get("state", {})
            if "value" in state and isinstance(state["value"], str):
                updates.append((message.received, state["value"]))
        return updates


class KernelSession:
    """One kernel process for a test module; ``execute`` runs a cell in it."""

    def __init__(self, env: dict[str, str], cwd: Path, *, kernel_name: str = "python3", ready_timeout: float = 60) -> None:
        self.manager = KernelManager(kernel_name=kernel_name)
        self.manager.start_kernel(env=env, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=ready_timeout)
        # Messages that arrived while another request was being collected.
        self._replies: dict[str, dict[str, Any]] = {}
        self._iopub: dict[str, list[dict[str, Any]]] = {}

    def submit(self, code: str, *, cell_id: str | None = None, allow_stdin: bool = False) -> str:
        """Send an execute request as a front end does; return its message id."""
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        }
        metadata = {"cellId": cell_id} if cell_id else {}
        request = self.client.session.msg("execute_request", content, metadata=metadata)
        self.client.shell_channel.send(request)
        return request["header"]["msg_id"]

    def execute(
        self,
        code: str,
        *,
        cell_id: str | None = None,
        timeout: float = 60.0,
        stdin: Callable[[str], str] | None = None,
        during: Callable[[Message], None] | None = None,
        quiet: bool = False,
    ) -> Execution:
        """Run ``code``; ``during`` sees each IOPub message as it arrives.

        ``quiet``: read nothing until the reply has come, then the cell's IOPub messages, so
        that this process takes no CPU from the kernel while the cell runs (benchmarks time
        the cell inside the kernel; arrival times then mean nothing).
        """
        msg_id = self.submit(code, cell_id=cell_id, allow_stdin=stdin is not None)
        return self.collect(msg_id, code=code, timeout=timeout, stdin=stdin, during=during, quiet=quiet)

    def collect(
        self,
        msg_id: str,
        *,
        code: str = "",
        timeout: float = 60.0,
        stdin: Callable[[str], str] | None = None,
        during: Callable[[Message], None] | None = None,
        quiet: bool = False,
    ) -> Execution:
        """Gather the reply and the IOPub messages of one request, until the kernel is idle.

        ``quiet``: IOPub is read only once the reply is in (see ``execute``).

        Messages of other requests (a queued cell, as in Run All) are kept for their own
        ``collect``.
        """
        client = self.client
        # Wait on every channel at once: a message is read the moment it arrives, and the
        # cell is done as soon as both its reply and its idle status are in.
        poller = zmq.Poller()
        poller.register(client.shell_channel.socket, zmq.POLLIN)
        if not quiet:
            poller.register(client.iopub_channel.socket, zmq.POLLIN)
        if stdin is not None:
            poller.register(client.stdin_channel.socket, zmq.POLLIN)
        execution = Execution(reply={}, started=time.monotonic())
        deadline = time.monotonic() + timeout
        idle = False
        while not idle or not execution.reply:
            if not execution.reply and msg_id in self._replies:
                execution.reply = self._replies.pop(msg_id)
                if quiet:
                    poller.register(client.iopub_channel.socket, zmq.POLLIN)
                continue
            backlog = self._iopub.get(msg_id)
            if backlog:
                idle = self._record(backlog.pop(0), execution, during) or idle
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:60]!r}")
            ready = dict(poller.poll(min(remaining, 1.0) * 1000))
            if stdin is not None and client.stdin_channel.socket in ready:
                asked = client.stdin_channel.get_msg(timeout=0)
                prompt = asked["content"]["prompt"]
                execution.stdin_prompts.append(prompt)
                execution.stdin_hidden.append(bool(asked["content"].get("password")))
                client.input(stdin(prompt))
            if client.shell_channel.socket in ready:
                reply = client.shell_channel.get_msg(timeout=0)
                self._replies[reply["parent_header"].get("msg_id")] = reply["content"]
            if client.iopub_channel.socket in ready:
                raw = client.iopub_channel.get_msg(timeout=0)
                self._iopub.setdefault(raw["parent_header"].get("msg_id"), []).append(raw)
        return execution

    @staticmethod
    def _record(raw: dict[str, Any], execution: Execution, during: Callable[[Message], None] | None) -> bool:
        """Add one IOPub message to the execution; True if it says the kernel is idle."""
        msg_type = raw["header"]["msg_type"]
        if msg_type == "status":
            return raw["content"]["execution_state"] == "idle"
        message = Message(
            received=time.monotonic(),
            msg_type=msg_type,
            content=raw["content"],
            metadata=raw.get("metadata", {}),
            size=len(json.dumps(_jsonable(raw), default=str)),
            content_size=len(json.dumps(raw["content"], default=str)),
        )
        execution.messages.append(message)
        if during is not None:
            during(message)
        return False

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _jsonable(message: dict[str, Any]) -> dict[str, Any]:
    keys = ("header", "parent_header", "metadata", "content")
    return {key: message.get(key) for key in keys}


def kernel_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment isolated from the developer's own IPython and dashscope settings.

    The locale is C.UTF-8 (messages in English, as the tests expect them) unless ``extra``
    sets LANG or another locale variable.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DASHSCOPE_", "JPY_", "JUPYTER_", "QWEN_MAGIC_"))
        and key not in ("LC_ALL", "LC_MESSAGES", "LANGUAGE")
    }
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        IPYTHONDIR=str(tmp / "ipython"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
        QWEN_MAGIC_STORE=str(tmp / "history.sqlite3"),
        LANG="C.UTF-8",
    )
    env.update(extra)
    return env
