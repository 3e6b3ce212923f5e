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


# What a session keeps between answers: the shared layout and style, and the frame (a box
# and its open block) that the next answer reuses.
SESSION_WIDGETS = ["HTMLModel", "HTMLStyleModel", "LayoutModel", "VBoxModel"]


def opened_comms(execution: Execution) -> dict[str, str]:
    """Comm id -> model name of every widget the cell opened."""
    return {m.content["comm_id"]: m.content["data"]["state"]["_model_name"] for m in execution.of_type("comm_open")}


def closed_comms(execution: Execution) -> set[str]:
    return {m.content["comm_id"] for m in execution.of_type("comm_close")}


def widgets_left_open(execution: Execution) -> list[str]:
    """The model names of the widgets the cell opened and left open, checked to hold no text."""
    opened = opened_comms(execution)
    left = set(opened) - closed_comms(execution)
    values: dict[str, str] = {}
    for message in execution.of_type("comm_open", "comm_msg"):
        state = message.content.get("data", {}).get("state", {})
        if message.content["comm_id"] in left and "value" in state:
            values[message.content["comm_id"]] = state["value"]
    assert not any(values.values()), f"an answer was left in a live widget: {values}"
    return sorted(opened[comm_id] for comm_id in left)


def test_the_answer_streams_before_the_last_frame_is_sent(cells: Cells, gateway: Gateway) -> None:
    paragraphs = [f"Paragraph {n} of the streamed answer.\n\n" for n in range(1, 11)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.15))
    execution = cells.run("%%qwen\nTell me ten things.")
    assert execution.status == "ok"

    updates = execution.widget_value_updates()
    final_update = execution.of_type("update_display_data")[-1]
    early = [(at, value) for at, value in updates if "Paragraph 1 " in value and "Paragraph 10" not in value]
    assert early, "no partial answer reached the front end"
    # The first partial view arrived while at least 8 more frames (>= 1.2 s) were still to come.
    assert final_update.received - early[0][0] > 1.0
    # The answer grew in several visible steps, not all at once.
    steps = {value for _, value in updates if "Paragraph" in value}
    assert len(steps) >= 3


def live_view_html(messages: list[Message]) -> str:
    """What the live view shows after these messages: its widget tree, read as a front end does."""
    states: dict[str, dict] = {}
    root = None
    for message in messages:
        if message.msg_type in ("comm_open", "comm_msg"):
            state = message.content.get("data", {}).get("state")
            if state:
                states.setdefault(message.content["comm_id"], {}).update(state)
        elif message.msg_type == "display_data" and WIDGET_VIEW in message.content["data"]:
            root = message.content["data"][WIDGET_VIEW]["model_id"]

    def shown(model_id: str) -> str:
        state = states[model_id]
        if "children" in state:
            return "".join(shown(child.removeprefix("IPY_MODEL_")) for child in state["children"])
        return state.get("value", "")

    return shown(root) if root else ""


def test_the_live_view_keeps_every_block_in_order_as_a_long_answer_is_regrouped(
    cells: Cells, gateway: Gateway
) -> None:
    paragraphs = [f"Paragraph {n} of a long answer.\n\n" for n in range(1, 17)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.13))
    execution = cells.run("%%qwen\nTell me sixteen things.")
    assert execution.status == "ok"
    # Each update ends by setting the open block (a freeze adds the frozen block just before):
    # there the view is whole again.
    # (Until the durable output replaces the view: then the frame is emptied for the next answer.)
    replaced_at = next(i for i, m in enumerate(execution.messages) if m.msg_type == "update_display_data")
    updates_done = [i for i, m in enumerate(execution.messages[:replaced_at])
                    if m.msg_type == "comm_msg" and "value" in m.content["data"].get("state", {})]
    seen = []
    for index in updates_done:
        html = live_view_html(execution.messages[: index + 1])
        shown = [int(n) for n in re.findall(r"Paragraph (\d+) ", html)]
        assert shown == list(range(1, len(shown) + 1)), shown  # in order, none twice, none missing
        seen.append(len(shown))
    assert len(set(seen)) > 8 and seen[-1] >= 14, seen
    assert "Paragraph 16 " in final_answer(execution)["data"]["text/markdown"]
    # More blocks were frozen than fit the box itself: they were moved into groups.
    boxes = [m for m in execution.of_type("comm_open") if m.content["data"]["state"]["_model_name"] == "VBoxModel"]
    assert len(boxes) >= 3
    assert widgets_left_open(execution) == SESSION_WIDGETS


def test_a_first_frame_that_finishes_a_block_shows_it_frozen_above_the_open_one(
    cells: Cells, gateway: Gateway
) -> None:
    gateway.script(Reply(chunks=["First block.\n\nSecond", " block."], frame_delay=0.5))
    execution = cells.run("%%qwen\nTwo blocks.")
    shown_at = next(i for i, m in enumerate(execution.messages) if m.msg_type == "display_data")
    assert live_view_html(execution.messages[: shown_at + 1]) == "<p>First block.</p>\n<p>Second</p>\n"
    # The frozen block, the open one, the box (with the session's layout and style).
    assert sorted(opened_comms(execution).values()) == sorted([*SESSION_WIDGETS, "HTMLModel"])
    assert widgets_left_open(execution) == SESSION_WIDGETS


def test_the_durable_output_replaces_the_widget_and_carries_a_footer(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="# Title\n\nSome **bold** text.", usage={"input_tokens": 30, "output_tokens": 9}))
    execution = cells.run("%%qwen\nFormat something.")
    output = final_answer(execution)
    data = output["data"]
    assert WIDGET_VIEW not in data
    assert data["text/markdown"].startswith("# Title\n\nSome **bold** text.")
    assert "<h1>Title</h1>" in data["text/html"] and "<strong>bold</strong>" in data["text/html"]
    for shown in (data["text/markdown"], data["text/html"]):
        assert "qwen-plus · 30 in / 9 out tokens ·" in shown
    meta = output["metadata"]["qwen_magic"]
    assert meta["status"] == "complete" and meta["usage"]["output_tokens"] == 9
    # Once the durable output is in place, the answer's frozen blocks are closed; the session
    # keeps its layout and style, and the frame emptied for the next answer.
    kept = set(opened_comms(execution)) - closed_comms(execution)
    assert widgets_left_open(execution) == SESSION_WIDGETS
    shown = next(m for m in execution.of_type("display_data"))
    box = shown.content["data"][WIDGET_VIEW]["model_id"]
    assert box in kept

    gateway.script(Reply(chunks=["A second answer.\n\n", "With two ", "blocks."], frame_delay=0.3))
    second = cells.run("%%qwen\nAgain.")
    # The second answer opens only its frozen block: the frame is shown again, refilled.
    assert list(opened_comms(second).values()) == ["HTMLModel"]
    assert widgets_left_open(second) == []
    assert second.widget_value_updates()[-1][1] == ""  # emptied again once the answer ended
    shown_again = next(m for m in second.of_type("display_data"))
    assert shown_again.content["data"][WIDGET_VIEW]["model_id"] == box
    assert "A second answer." in final_answer(second)["data"]["text/markdown"]

    unloaded = cells.run("%unload_ext qwen_magic")
    assert kept <= closed_comms(unloaded)


def test_the_view_says_it_is_waiting_until_the_first_text(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="Finally.", first_token_delay=1.6))
    execution = cells.run("%%qwen\nTake your time.")
    waiting = [value for _, value in execution.widget_value_updates() if "Waiting for qwen-plus" in value]
    assert any("1 s" in value for value in waiting), waiting
    # The view appears with the wait already in it: no empty widget is shown first.
    first_open = next(m for m in execution.of_type("comm_open") if m.content["data"]["state"].get("value"))
    assert "Waiting for qwen-plus" in first_open.content["data"]["state"]["value"]
    assert "Finally." in final_answer(execution)["data"]["text/markdown"]


def test_hostile_markup_in_an_answer_stays_text(cells: Cells, gateway: Gateway) -> None:
    gateway.script(Reply(text="Look: <script>alert(1)</script> and <img src=x onerror=alert(2)>"))
    execution = cells.run("%%qwen\nBe naughty.")
    html = final_answer(execution)["data"]["text/html"]
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    for _, value in execution.widget_value_updates():
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
        saving = kernel.submit("%%qwen\nAnswer briefly.")
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
        assert widgets_left_open(execution) == SESSION_WIDGETS
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
    execution = cells.run("%%qwen --thinking\nLife?")
    values = [value for _, value in execution.widget_value_updates()]
    opened = [i for i, v in enumerate(values) if v.startswith('<details class="qwen-thinking" open>')]
    folded = [i for i, v in enumerate(values) if v.startswith('<details class="qwen-thinking">')]
    answer = [i for i, v in enumerate(values) if "The answer" in v]
    assert opened and folded and answer
    assert max(opened) < min(folded) <= min(answer)
    html = final_answer(execution)["data"]["text/html"]
    assert html.startswith('<details class="qwen-thinking"><summary>Thinking (')
    assert "The answer is 42." in html
