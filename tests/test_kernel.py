"""%%qwen in a real kernel, seen from the front end's side of jupyter_client."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from qwen_magic.gateway import Gateway, Reply

from .conftest import TEST_KEY
from .kernel_harness import Execution, KernelSession, Message, kernel_env

pytestmark = pytest.mark.kernel

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def kernel(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSession]:
    tmp = tmp_path_factory.mktemp("kernel")
    env = kernel_env(tmp, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url)
    session = KernelSession(env, cwd=tmp)
    yield session
    session.shutdown()


class Cells:
    """Runs cells in the module's kernel, each test with a freshly loaded extension."""

    def __init__(self, kernel: KernelSession) -> None:
        self.kernel = kernel

    def run(self, code: str, **kwargs) -> Execution:
        """Run a cell; give ``cell_id`` to send it as JupyterLab does (the live view is a widget)."""
        execution = self.kernel.execute(code, **kwargs)
        everything = json.dumps([m.content for m in execution.messages], default=str)
        assert TEST_KEY not in everything, "the API key reached the front end"
        return execution


@pytest.fixture
def cells(kernel: KernelSession, gateway: Gateway) -> Cells:
    cells = Cells(kernel)
    setup = cells.run("%reload_ext qwen_magic\n%config QwenMagic.display = 'auto'\n%config QwenMagic.timeout = None")
    assert setup.status == "ok", setup.outputs
    return cells


def final_answer(execution: Execution) -> dict:
    """The one durable display output the cell leaves."""
    displays = [o for o in execution.outputs if o["output_type"] == "display_data"]
    assert len(displays) == 1, execution.outputs
    return displays[0]


def answer_widgets(execution: Execution) -> list[str]:
    """The model ids of the answer widgets the cell opened."""
    return [m.content["comm_id"] for m in execution.of_type("comm_open")
            if m.content["data"]["state"]["_model_name"] == "AnyModel"]


def opened_comms(execution: Execution) -> dict[str, str]:
    """Comm id -> model name of every widget the cell opened."""
    return {m.content["comm_id"]: m.content["data"]["state"]["_model_name"] for m in execution.of_type("comm_open")}


def closed_comms(execution: Execution) -> set[str]:
    return {m.content["comm_id"] for m in execution.of_type("comm_close")}


class Page:
    """What a page shows of one answer widget: its state, then each custom message applied
    (the same steps as the widget's ESM, on strings)."""

    def __init__(self, state: dict) -> None:
        self.parts = {key: state.get(key, "") for key in ("reasoning", "body", "open_block", "after")}

    def apply(self, message: dict) -> None:
        parts = self.parts
        if "r" in message:
            parts["reasoning"] = _utf16_slice(parts["reasoning"], message["r"][0]) + message["r"][1]
        if "b" in message:
            parts["body"], parts["open_block"] = message["b"], ""
        if "f" in message:
            parts["body"] += _utf16_slice(parts["open_block"], message["f"][0]) + message["f"][1]
            parts["open_block"] = ""
        if "o" in message:
            parts["open_block"] = _utf16_slice(parts["open_block"], message["o"][0]) + message["o"][1]
        if "x" in message:
            parts["after"] = message["x"]

    @property
    def html(self) -> str:
        return "".join(self.parts.values())


def _utf16_slice(text: str, units: int) -> str:
    return text.encode("utf-16-le")[: units * 2].decode("utf-16-le")


def live_steps(execution: Execution) -> list[tuple[float, str]]:
    """(arrival time, what the live page shows) after each message of the cell's answer widget."""
    page, model, steps = None, None, []
    for message in execution.messages:
        content = message.content
        if message.msg_type == "comm_open" and content["data"]["state"].get("_model_name") == "AnyModel":
            page, model = Page(content["data"]["state"]), content["comm_id"]
        elif message.msg_type == "comm_msg" and content["comm_id"] == model and content["data"]["method"] == "custom":
            page.apply(content["data"]["content"])
        else:
            continue
        steps.append((message.received, page.html))
    return steps


def requested_state(kernel: KernelSession, model_id: str) -> dict:
    """The state a page that loads the widget now gets (a reload asks the kernel for it)."""
    request = kernel.client.session.msg("comm_msg", {"comm_id": model_id, "data": {"method": "request_state"}})
    kernel.client.shell_channel.send(request)
    kernel.execute("pass")  # handled in order: the state request's answer is in by then
    replies = kernel._iopub.pop(request["header"]["msg_id"], [])
    states = [r["content"]["data"]["state"] for r in replies if r["header"]["msg_type"] == "comm_msg"]
    assert states, "the widget did not answer"
    return states[-1]


def test_the_answer_streams_before_the_last_frame_is_sent(cells: Cells, gateway: Gateway) -> None:
    paragraphs = [f"Paragraph {n} of the streamed answer.\n\n" for n in range(1, 11)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.15))
    execution = cells.run("%%qwen\nTell me ten things.", cell_id="stream-1")
    assert execution.status == "ok"

    updates = live_steps(execution)
    final_update = execution.of_type("update_display_data")[-1]
    early = [(at, html) for at, html in updates if "Paragraph 1 " in html and "Paragraph 10" not in html]
    assert early, "no partial answer reached the front end"
    # The first partial view arrived while at least 8 more frames (>= 1.2 s) were still to come.
    assert final_update.received - early[0][0] > 1.0
    # The answer grew in several visible steps, not all at once.
    steps = {html for _, html in updates if "Paragraph" in html}
    assert len(steps) >= 3


def test_the_live_view_keeps_every_block_in_order_and_opens_one_widget(
    cells: Cells, gateway: Gateway
) -> None:
    paragraphs = [f"Paragraph {n} of a long answer with **bold words** in it.\n\n" for n in range(1, 17)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.13, chunk_size=9))
    execution = cells.run("%%qwen\nTell me sixteen things.", cell_id="order-1")
    assert execution.status == "ok"
    seen = []
    # What the live page shows after each message: the widget's steps, then the durable output.
    shown_html = [html for _, html in live_steps(execution)] + [final_answer(execution)["data"]["text/html"]]
    for html in shown_html:
        shown = [int(n) for n in re.findall(r"Paragraph (\d+) ", html)]
        assert shown == list(range(1, len(shown) + 1)), shown  # in order, none twice, none missing
        assert "**" not in html  # a half-written **bold shows as bold, never as raw markers
        seen.append(len(shown))
    assert len(set(seen)) > 8 and seen[-1] == 16, seen
    assert "Paragraph 16 " in final_answer(execution)["data"]["text/markdown"]
    # One widget per answer, with no layout of its own (the view needs none).
    assert list(opened_comms(execution).values()) == ["AnyModel"]
    assert not closed_comms(execution)
    gateway.script(Reply(chunks=["Another answer.\n\n", "Two blocks."], frame_delay=0.2))
    again = cells.run("%%qwen\nAgain.", cell_id="order-2")
    # The next answer's widget refers to no model it did not open itself: a page reloaded while
    # a cell runs never hears of models made before, and waits for them for good.
    opened = opened_comms(again)
    assert list(opened.values()) == ["AnyModel"] and not closed_comms(again)
    references = {value[len("IPY_MODEL_"):] for m in again.of_type("comm_open")
                  for value in m.content["data"]["state"].values()
                  if isinstance(value, str) and value.startswith("IPY_MODEL_")}
    assert references <= set(opened), (references, opened)
    assert all(m.content["data"]["state"]["layout"] is None for m in again.of_type("comm_open"))


def test_a_first_frame_that_finishes_a_block_shows_it_frozen_above_the_open_one(
    cells: Cells, gateway: Gateway
) -> None:
    gateway.script(Reply(chunks=["First block.\n\nSecond", " block."], frame_delay=0.5))
    execution = cells.run("%%qwen\nTwo blocks.", cell_id="first-frame")
    (opened,) = [m for m in execution.of_type("comm_open") if m.content["data"]["state"]["_model_name"] == "AnyModel"]
    state = opened.content["data"]["state"]
    assert state["body"] + state["open_block"] == "<p>First block.</p>\n<p>Second</p>\n"
    (shown,) = execution.of_type("display_data")
    assert shown.content["data"][WIDGET_VIEW]["model_id"] == opened.content["comm_id"]
    # Text beside the view, for whatever cannot show the widget (a notebook saved mid-stream).
    assert shown.content["data"]["text/markdown"].startswith("First block.\n\nSecond")
    assert "<p>First block.</p>" in shown.content["data"]["text/html"]


def test_each_answer_has_its_own_widget_which_ends_holding_its_answer_and_footer(
    cells: Cells, kernel: KernelSession, gateway: Gateway
) -> None:
    gateway.script(Reply(chunks=["# Title\n\nSome **bold** ", "text."], frame_delay=0.3,
                         usage={"input_tokens": 30, "output_tokens": 9}))
    first = cells.run("%%qwen\nFormat something.", cell_id="cell-a")
    output = final_answer(first)
    data = output["data"]
    assert WIDGET_VIEW not in data
    assert data["text/markdown"].startswith("# Title\n\nSome **bold** text.")
    assert "<h1>Title</h1>" in data["text/html"] and "<strong>bold</strong>" in data["text/html"]
    for shown in (data["text/markdown"], data["text/html"]):
        assert "qwen-plus · 30 in / 9 out tokens ·" in shown
    meta = output["metadata"]["qwen_magic"]
    assert meta["status"] == "complete" and meta["usage"]["output_tokens"] == 9

    gateway.script(Reply(chunks=["A second answer.\n\n", "With two ", "blocks."], frame_delay=0.3))
    second = cells.run("%%qwen\nAgain.", cell_id="cell-b")
    (first_model,), (second_model,) = answer_widgets(first), answer_widgets(second)
    assert first_model != second_model
    assert "Title" not in json.dumps([m.content for m in second.messages])
    # A page reloaded now asks for each widget's state: each holds its own answer and footer.
    first_state, second_state = requested_state(kernel, first_model), requested_state(kernel, second_model)
    assert "<h1>Title</h1>" in first_state["body"] and "second answer" not in first_state["body"]
    assert "A second answer." in second_state["body"] and "Title" not in second_state["body"]
    assert first_state["open_block"] == "" and "qwen-plus · 30 in / 9 out tokens" in first_state["after"]
    # And the durable output the live page ends with shows the same answer and footer.
    durable = final_answer(first)["data"]["text/html"]
    assert first_state["body"] in durable and durable.endswith(first_state["after"])

    unloaded = cells.run("%unload_ext qwen_magic")
    assert {first_model, second_model} <= closed_comms(unloaded)


def test_a_state_asked_for_mid_stream_is_answered_with_the_whole_answer_after_the_cell(
    cells: Cells, kernel: KernelSession, gateway: Gateway
) -> None:
    # A page reloaded mid-stream asks for the widgets; the kernel answers once the cell is done.
    gateway.script(Reply(chunks=[f"Part {n}. " for n in range(30)], frame_delay=0.05))
    streaming = kernel.submit("%%qwen\nStream.", cell_id="reloaded")
    asked: list[str] = []

    def ask_once_shown(message: Message) -> None:
        if not asked and message.msg_type == "comm_open" and message.content["data"]["state"].get("_model_name") == "AnyModel":
            asked.append(message.content["comm_id"])
            request = kernel.client.session.msg(
                "comm_msg", {"comm_id": asked[0], "data": {"method": "request_state"}})
            kernel.client.shell_channel.send(request)
            asked.append(request["header"]["msg_id"])

    execution = kernel.collect(streaming, during=ask_once_shown, timeout=30)
    assert execution.status == "ok" and asked
    kernel.execute("pass")
    (reply,) = [r for r in kernel._iopub.pop(asked[1]) if r["header"]["msg_type"] == "comm_msg"]
    state = reply["content"]["data"]["state"]
    assert "Part 0. " in state["body"] and "Part 29." in state["body"] and "qwen-plus ·" in state["after"]


def test_a_cell_run_without_a_front_end_uses_no_widgets(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(chunks=["One. ", "Two. ", "Three."], frame_delay=0.2))
    execution = cells.run("%%qwen\nCount.")  # no cellId: nbconvert, papermill
    assert not execution.of_type("comm_open", "comm_msg")
    assert final_answer(execution)["data"]["text/markdown"].startswith("One. Two. Three.")


def test_the_view_says_it_is_waiting_until_the_first_text(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="Finally.", first_token_delay=1.6))
    execution = cells.run("%%qwen\nTake your time.", cell_id="waiting")
    waiting = [html for _, html in live_steps(execution) if "Waiting for qwen-plus" in html]
    assert any("1 s" in html for html in waiting), waiting
    # The view appears with the wait already in it: no empty widget is shown first.
    first_open = next(m for m in execution.of_type("comm_open") if m.content["data"]["state"].get("_model_name") == "AnyModel")
    assert "Waiting for qwen-plus" in first_open.content["data"]["state"]["open_block"]
    assert "Finally." in final_answer(execution)["data"]["text/markdown"]


def test_hostile_markup_in_an_answer_stays_text(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="Look: <script>alert(1)</script> and <img src=x onerror=alert(2)>"))
    execution = cells.run("%%qwen\nBe naughty.", cell_id="naughty")
    html = final_answer(execution)["data"]["text/html"]
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    steps = live_steps(execution)
    assert steps
    for _, value in steps:
        assert "<script" not in value and "<img" not in value


def test_markdown_display_mode_streams_without_widgets(cells: Cells, gateway: Gateway) -> None:
    cells.run("%config QwenMagic.display = 'markdown'")
    gateway.script(Reply(chunks=["One. ", "Two. ", "Three. ", "Four. ", "Five."], frame_delay=0.3))
    execution = cells.run("%%qwen\nCount.")
    assert not execution.of_type("comm_open")
    (first,) = execution.of_type("display_data")
    assert first.content["data"]["text/markdown"].startswith("One.")  # no empty output first
    live = [m.content["data"]["text/markdown"] for m in execution.of_type("update_display_data")][:-1]
    assert live[:3] == ["One. Two. ", "One. Two. Three. ", "One. Two. Three. Four. "]  # as each frame came
    assert final_answer(execution)["data"]["text/markdown"].startswith("One. Two. Three. Four. Five.")


def test_text_printed_before_an_output_is_sent_before_it(cells: Cells) -> None:
    # Outputs are published without flushing idle streams; text waiting in one still goes first.
    execution = cells.run(
        "from qwen_magic.publish import display\n"
        "print('printed first')\n"
        "handle = display({'text/plain': 'shown'}, raw=True)\n"
        "handle.update({'text/plain': 'replaced'}, raw=True)"
    )
    kinds = [m.msg_type for m in execution.messages if m.msg_type != "execute_input"]
    assert kinds == ["stream", "display_data", "update_display_data"], kinds
    assert execution.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "printed first\n"},
        {"output_type": "display_data", "data": {"text/plain": "replaced"}, "metadata": {}},
    ]


def test_text_display_mode_in_a_kernel_streams_as_stdout(cells: Cells, gateway: Gateway) -> None:
    cells.run("%config QwenMagic.display = 'text'")
    gateway.script(Reply(chunks=["One. ", "Two. ", "Three. ", "Four."], frame_delay=0.3,
                         usage={"input_tokens": 9, "output_tokens": 4}))
    execution = cells.run("%%qwen\nCount.")
    streams = [m for m in execution.of_type("stream") if m.content["name"] == "stdout"]
    text = "".join(m.content["text"] for m in streams)
    assert text.startswith("One. Two. Three. Four.\n\n[qwen-plus · 9 in / 4 out tokens")
    # The kernel's stream sends what was written every 0.2 s: the answer came in pieces.
    assert sum("One." in m.content["text"] or "Four." in m.content["text"] for m in streams) >= 2
    assert not execution.of_type("comm_open", "display_data")

    # What the cell prints or displays after the answer comes after its footer.
    gateway.script(Reply(text="Five.", usage={"input_tokens": 9, "output_tokens": 1}))
    after = cells.run('from IPython.display import display as show\n'
                      'get_ipython().run_cell_magic("qwen", "", "Count on.")\nprint("printed after")\n'
                      'show({"text/plain": "shown after"}, raw=True)')
    assert len(after.outputs) == 2, after.outputs
    printed, shown = after.outputs
    assert printed["text"].startswith("Five.\n\n[qwen-plus · 9 in / 1 out tokens")
    assert printed["text"].endswith("]\nprinted after\n")
    assert shown["data"] == {"text/plain": "shown after"}


def test_an_api_error_is_one_line_and_the_kernel_lives_on(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(status=401, error_code="InvalidApiKey", request_id="req-401"))
    execution = cells.run("%%qwen\nHi")
    assert execution.status == "error"
    error = execution.error
    assert error["traceback"] == [
        "DashScope error InvalidApiKey: Invalid API-key provided. (request id req-401) "
        + "Check the key: keys are region-specific (mainland vs international), so use the key "
        "of the region you call; set it with %qwen login or DASHSCOPE_API_KEY."
    ]
    assert not execution.of_type("comm_open")  # refused at once: no live view was worth making
    assert cells.run("%%qwen\nStill there?").status == "ok"


def test_a_cut_mid_stream_keeps_the_partial_answer_marked_failed(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(chunks=["Half ", "an ", "answer"], cut_after=2))
    execution = cells.run("%%qwen\nHi")
    assert execution.status == "error"
    data = final_answer(execution)["data"]
    assert data["text/markdown"].startswith("Half an ")
    assert "failed: StreamCut" in data["text/markdown"]
    assert execution.error["traceback"][0].startswith("DashScope error StreamCut:")


def test_login_asks_at_a_hidden_prompt_and_the_key_is_used(cells: Cells, gateway: Gateway) -> None:
    typed = "sk-typed-in-the-notebook-4242"
    login = cells.run("%qwen login", stdin=lambda prompt: typed)
    assert login.stdin_hidden == [True]
    assert "DashScope API key" in login.stdin_prompts[0]
    assert typed not in json.dumps([m.content for m in login.messages])
    assert "…4242" in login.stdout and "not saved" in login.stdout
    assert cells.run("%%qwen\nHi").status == "ok"
    assert gateway.requests[-1].api_key == typed


def test_a_usage_error_has_no_traceback(cells: Cells, gateway: Gateway) -> None:
    execution = cells.run("%%qwen --temperature hot\nHi")
    assert execution.status == "error"
    text = execution.stdout + "".join(o.get("text", "") for o in execution.outputs if o["output_type"] == "stream")
    assert "UsageError: argument -t/--temperature: invalid float value: 'hot'" in text
    assert execution.error is None
    assert gateway.requests == []


def test_interrupt_keeps_the_partial_answer_and_stops_run_all(cells: Cells, kernel: KernelSession, gateway: Gateway) -> None:
    gateway.script(Reply(chunks=[f"word{n} " for n in range(200)], frame_delay=0.05))
    streaming = kernel.submit("%%qwen\nTalk for a long time.")
    queued = kernel.submit("after_interrupt = True")  # the next cell of a Run All

    interrupted = []

    def interrupt_once_text_shows(message: Message) -> None:
        if not interrupted and "word3" in json.dumps(message.content):
            interrupted.append(message.received)
            kernel.interrupt()

    execution = kernel.collect(streaming, during=interrupt_once_text_shows, timeout=30)
    assert interrupted, "no text streamed before the interrupt"
    assert execution.status == "error"
    assert execution.error["ename"] == "QwenInterrupted"
    assert len(execution.error["traceback"]) == 1 and "partial text is kept" in execution.error["traceback"][0]
    data = final_answer(execution)["data"]
    assert data["text/markdown"].startswith("word0 word1 word2 word3")
    assert "word199" not in data["text/markdown"]
    assert "interrupted: partial answer" in data["text/markdown"]
    # What was sent and streamed is billed even when the stream is cut short: it is counted.
    meta = final_answer(execution)["metadata"]["qwen_magic"]
    assert meta["status"] == "interrupted" and meta["usage"]["input_tokens"] > 0 and meta["cost"] > 0

    assert kernel.collect(queued).status == "aborted"
    check = cells.run("print('after_interrupt' in globals())")
    assert check.stdout.strip() == "False"
    gateway.reset()
    assert cells.run("%%qwen\nAre you still there?").status == "ok"


def test_an_interrupt_while_the_answer_is_saved_is_held_until_it_is_written(
    cells: Cells, kernel: KernelSession, gateway: Gateway
) -> None:
    # Writing the durable output is made slow, so that the interrupt lands in the middle of it.
    slow = cells.run(
        "import time, qwen_magic.view as _view\n"
        "_durable = _view.durable_bundle\n"
        "_view.durable_bundle = lambda *args, **kwargs: (time.sleep(1.5), _durable(*args, **kwargs))[1]"
    )
    assert slow.status == "ok"
    try:
        gateway.script(Reply(text="A complete answer.", usage={"input_tokens": 9, "output_tokens": 4}))
        saving = kernel.submit("%%qwen\nAnswer briefly.", cell_id="saving")
        queued = kernel.submit("after_late_interrupt = True")
        interrupted = []

        def interrupt_once_the_answer_shows(message: Message) -> None:
            shown = message.msg_type in ("comm_open", "comm_msg") and "A comple" in json.dumps(message.content)
            if shown and not interrupted:
                interrupted.append(message.received)
                time.sleep(0.3)  # the answer is complete by now: its output is being written
                kernel.interrupt()

        execution = kernel.collect(saving, during=interrupt_once_the_answer_shows, timeout=30)
        assert interrupted
        assert execution.error["ename"] == "QwenInterrupted"
        assert execution.error["traceback"] == [
            "KeyboardInterrupt: stopped as the answer was being saved; it is complete and kept."
        ]
        data = final_answer(execution)["data"]
        assert data["text/markdown"].startswith("A complete answer.\n\n*qwen-plus · 9 in / 4 out tokens")
        assert "interrupted" not in data["text/markdown"]
        assert kernel.collect(queued).status == "aborted"
        turns = cells.run("%qwen history")
        assert "A complete answer." in json.dumps([o.get("data", o.get("text")) for o in turns.outputs])
    finally:
        cells.run("_view.durable_bundle = _durable")


def test_a_notebook_runs_under_nbclient_and_saves_plain_outputs(
    gateway: Gateway, tmp_path: Path
) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("%load_ext qwen_magic"),
        nbformat.v4.new_code_cell("%%qwen -o answer\n你好，请介绍一下你自己。"),
        nbformat.v4.new_code_cell("answer.usage.output_tokens > 0, answer.status"),
    ]
    env = kernel_env(tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url)
    NotebookClient(notebook, timeout=60, store_widget_state=True).execute(env=env, cwd=str(tmp_path))
    path = tmp_path / "executed.ipynb"
    nbformat.write(notebook, path)

    saved = nbformat.read(path, as_version=4)
    (answer_output,) = saved.cells[1].outputs
    assert answer_output.output_type == "display_data"
    assert WIDGET_VIEW not in answer_output.data
    assert "离线网关" in answer_output.data["text/markdown"]
    assert "qwen-plus ·" in answer_output.data["text/html"]
    assert saved.cells[2].outputs[0].data["text/plain"] == "(True, 'complete')"


def test_code_format_puts_the_code_in_a_new_cell_below(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="Try this:\n\n```python\nimport math\nprint(math.pi)\n```"))
    execution = cells.run("%%qwen -f code\nPrint pi")
    assert execution.status == "ok"
    assert {"source": "set_next_input", "text": "import math\nprint(math.pi)", "replace": False} in [
        {key: p.get(key) for key in ("source", "text", "replace")} for p in execution.reply["payload"]
    ]
    assert "```python" in final_answer(execution)["data"]["text/markdown"]


def test_thinking_streams_into_a_section_that_folds_when_the_answer_starts(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(reasoning="First I consider the question carefully. " * 3,
                         text="The answer is 42. It follows from the question.", chunk_size=12, frame_delay=0.08))
    execution = cells.run("%%qwen --thinking\nLife?", cell_id="thinking")
    values = [value for _, value in live_steps(execution)]
    opened = [i for i, v in enumerate(values) if v.startswith('<details class="qwen-thinking" open>')]
    folded = [i for i, v in enumerate(values) if v.startswith('<details class="qwen-thinking">')]
    answer = [i for i, v in enumerate(values) if "The answer" in v]
    assert opened and folded and answer
    assert max(opened) < min(folded) <= min(answer)
    html = final_answer(execution)["data"]["text/html"]
    assert html.startswith('<details class="qwen-thinking"><summary>Thinking (')
    assert "The answer is 42." in html


def test_a_notebook_executed_headless_keeps_no_widget_state_and_exports_offline_html(
    gateway: Gateway, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("%load_ext qwen_magic"),
        nbformat.v4.new_code_cell("%%qwen\nWrite two paragraphs."),
    ]
    path = tmp_path / "headless.ipynb"
    nbformat.write(notebook, path)
    gateway.script(Reply(chunks=["First **paragraph**.\n\n", "Second ", "paragraph."], frame_delay=0.3))
    env = kernel_env(tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url)
    for target in ("notebook", "html"):
        subprocess.run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", target, "--execute", str(path),
             "--output", f"executed-{target}"],
            env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120,
        )
        if target == "notebook":
            gateway.script(Reply(chunks=["First **paragraph**.\n\n", "Second ", "paragraph."], frame_delay=0.3))

    executed = nbformat.read(tmp_path / "executed-notebook.ipynb", as_version=4)
    assert "widgets" not in executed.metadata
    (output,) = executed.cells[1].outputs
    assert WIDGET_VIEW not in output.data
    assert output.data["text/markdown"].startswith("First **paragraph**.\n\nSecond paragraph.")
    html = (tmp_path / "executed-html.html").read_text()
    assert "<strong>paragraph</strong>" in html and "qwen-plus ·" in html
    # Nothing loaded from the network for the answer: no widget state, no widget manager. (The
    # nbconvert template itself links require.js and MathJax from a CDN for any notebook: the
    # same remote scripts as a notebook of plain code.)
    plain = tmp_path / "plain.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), plain)
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(plain)],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    remote = re.compile(r"<(?:script|link)[^>]*(?:src|href)=[\"'](https?://[^\"']+)")
    assert set(remote.findall(html)) == set(remote.findall((tmp_path / "plain.html").read_text()))
    assert "widget-state+json" not in html and "html-manager" not in html
