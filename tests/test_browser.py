"""What a person sees: JupyterLab 4 and Notebook 7 in headless Chromium, driven by Playwright.

Every test runs in both front ends (one server each per module, one browser for the module)
against the offline gateway. Debian's chromium is used through its executable path (no
browser download). What is asserted is what a person sees: the text of a cell's output, the
computed type and size of its elements, and the notebook file as saved on disk.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import nbformat
import pytest

from qwen_magic.gateway import Gateway, Reply

from .browser_harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    KINDS,
    MEASURE_JS,
    WIDGET_TROUBLE,
    FrontEnd,
    NotebookPage,
    contrast,
    package_under_test,
    qwen_outputs,
    start_front_end,
    text_problems,
)
from .conftest import TEST_KEY

pytestmark = pytest.mark.browser

# A line saying the kernel restarted, in either word order.
RESTARTED = re.compile(r"\bkernel\b[^\n]*\brestart|\brestart[^\n]*\bkernel\b", re.IGNORECASE)


@pytest.fixture(scope="module", params=KINDS, ids=["jupyterlab", "notebook7"])
def front_end(request: pytest.FixtureRequest, gateway_server: Gateway,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontEnd]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for the browser tests: bash scripts/test.sh installs it")
    tmp = tmp_path_factory.mktemp(request.param)
    environment = {"DASHSCOPE_API_KEY": TEST_KEY, "DASHSCOPE_BASE_URL": gateway_server.base_url,
                   "QWEN_MAGIC_STORE": str(tmp / "history.sqlite3")}
    with start_front_end(request.param, tmp, environment) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, front_end: FrontEnd, gateway: Gateway):
    """Pages of their own (a fresh browser context each); their kernels end with the test."""
    contexts = []

    def new_page() -> NotebookPage:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?" on a reload
        return NotebookPage(page, front_end)

    yield new_page
    for context in contexts:
        context.close()
    front_end.shut_down_kernels()


@pytest.fixture
def notebook(open_page) -> NotebookPage:
    return open_page()


class Findings:
    """What a long scenario saw wrong, each in a plain sentence; asserted once at its end,
    so one run says everything that differs from what is required."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def extend(self, problems: list[str]) -> None:
        self.problems.extend(problems)

    def assert_none(self) -> None:
        if self.problems:
            raise AssertionError("\n".join(["", *self.problems]))


def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds; say whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for_text(notebook: NotebookPage, index: int, holds, timeout: float) -> str:
    """What cell ``index`` shows once ``holds(text)``, or what it shows after ``timeout`` seconds."""
    wait_until(lambda: holds(notebook.output_text(index)), timeout)
    return notebook.output_text(index)


def trouble_in(text: str) -> list[str]:
    return [phrase for phrase in WIDGET_TROUBLE if phrase in text]


# --------------------------------------------------------------------------- the happy path


def test_the_answer_grows_then_stays_with_its_footer_after_saving_and_reopening(
    notebook: NotebookPage, open_page, front_end: FrontEnd, gateway: Gateway
) -> None:
    name = front_end.notebook("stream.ipynb", "%load_ext qwen_magic\nimport qwen_magic\nprint(qwen_magic.__file__)",
                              "%%qwen\nTell me a story in ten paragraphs.")
    paragraphs = [f"Paragraph {n}: the river kept its own counsel.\n\n" for n in range(1, 13)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.3, usage={"input_tokens": 31, "output_tokens": 130}))
    notebook.open(name)
    notebook.run_cell(0)
    # The kernels import the code of this work tree (or of PYTHONPATH), not an installed copy.
    loaded = notebook.wait_for_output(0, "__init__.py").strip()
    assert Path(loaded).resolve().parent == package_under_test(), f"the kernel imported {loaded}"
    notebook.run_cell(1)

    seen: list[str] = []
    deadline = time.monotonic() + 60
    while "out tokens" not in (text := notebook.output_text(1)) and time.monotonic() < deadline:
        if "Paragraph" in text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    counts = [snapshot.count("Paragraph") for snapshot in seen]
    assert len(set(counts)) >= 3, f"the answer did not grow in visible steps: {counts}"
    assert counts == sorted(counts) and counts[0] < 12

    final = notebook.wait_for_output(1, "out tokens")
    assert "Paragraph 12" in final
    assert "qwen-plus · 31 in / 130 out tokens · ¥0.00028 · chat default, turn 1" in final
    notebook.screenshot("streamed-answer")

    # Save and reopen: the answer and its footer show, with no widget in the file or the page.
    notebook.save()
    saved = front_end.saved(name, until=lambda nb: bool(nb.cells[1].outputs))
    (output,) = saved.cells[1].outputs
    assert output.output_type == "display_data"
    assert "application/vnd.jupyter.widget-view+json" not in output.data, f"saved: {sorted(output.data)}"
    assert "Paragraph 12" in output.data["text/markdown"] and "out tokens" in output.data["text/html"]
    assert "widgets" not in saved.metadata, f"the file keeps widget state: {list(saved.metadata['widgets'])}"

    reopened = open_page()
    reopened.open(name)
    shown = reopened.wait_for_output(1, "out tokens")
    assert "Paragraph 12" in shown and "¥0.00028" in shown
    assert not trouble_in(shown), f"the reopened cell shows {shown!r}"
    assert reopened.widget_count(1) == 0, f"the reopened answer is shown by {reopened.widget_count(1)} widget views"


def test_markup_in_an_answer_runs_nothing(notebook: NotebookPage, front_end: FrontEnd, gateway: Gateway) -> None:
    name = front_end.notebook("hostile.ipynb", "%load_ext qwen_magic", "%%qwen\nBe naughty.")
    hostile = 'Look <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2"> done.'
    gateway.script(Reply(text=hostile, chunk_size=6, frame_delay=0.02))
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    text = notebook.wait_for_output(1, "out tokens")
    assert "<script>window.__pwned = 1</script>" in text  # shown as text
    assert notebook.page.evaluate("window.__pwned") is None
    assert notebook.page.locator(".jp-OutputArea img").count() == 0


def test_interrupting_from_the_toolbar_keeps_the_partial_answer(
    notebook: NotebookPage, front_end: FrontEnd, gateway: Gateway
) -> None:
    name = front_end.notebook("interrupt.ipynb", "%load_ext qwen_magic", "%%qwen\nCount slowly.")
    gateway.script(Reply(chunks=[f"word{n} " for n in range(300)], frame_delay=0.1))
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "word5 ")
    notebook.page.locator('[data-command="notebook:interrupt-kernel"]').first.click()
    # The one-line error comes last, after the durable output with its footer.
    text = notebook.wait_for_output(1, "KeyboardInterrupt: the answer was interrupted", timeout=30)
    assert text.startswith("word0 word1 word2 word3 word4 word5")
    assert "interrupted: partial answer" in text
    assert "word299" not in text
    notebook.screenshot("interrupted-answer")


def test_a_second_answer_streams_into_its_own_cell_and_the_first_stays(
    notebook: NotebookPage, front_end: FrontEnd, gateway: Gateway
) -> None:
    name = front_end.notebook("two.ipynb", "%load_ext qwen_magic", "%%qwen\nFirst question.", "%%qwen\nSecond question.")
    gateway.script(
        Reply(chunks=["The first answer.\n\n", "Its second block."], frame_delay=0.3),  # one block frozen
        Reply(chunks=[f"Step {n} of the second answer.\n\n" for n in range(1, 9)], frame_delay=0.3),
    )
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    first = notebook.wait_for_output(1, "out tokens")
    notebook.run_cell(2)

    seen: list[int] = []
    deadline = time.monotonic() + 60
    while "out tokens" not in (text := notebook.output_text(2)) and time.monotonic() < deadline:
        if "Step" in text and (not seen or text.count("Step") != seen[-1]):
            seen.append(text.count("Step"))
        time.sleep(0.05)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] < 8, seen
    second = notebook.wait_for_output(2, "out tokens")
    assert "Step 8 of the second answer." in second and "turn 2" in second
    assert "The first answer" not in second
    assert notebook.output_text(1) == first  # the first cell keeps its own answer


# --------------------------------------------------------------------------- off the happy path


@pytest.mark.parametrize("reloaded", ["while-streaming", "after-the-answer"])
def test_after_a_reload_each_cell_ends_with_its_own_whole_answer(
    notebook: NotebookPage, front_end: FrontEnd, gateway: Gateway, reloaded: str
) -> None:
    """Save while an answer streams, then reload (while it streams on, or once it ended): the
    cell ends with its own whole answer and footer, the next answer never shows in it, and
    whatever is saved holds text."""
    findings = Findings()
    name = front_end.notebook("reload.ipynb", "%load_ext qwen_magic", "%%qwen\nFirst question.",
                              "%%qwen\nSecond question.")
    gateway.script(
        Reply(chunks=[f"Alpha {n} of the first answer.\n\n" for n in range(1, 49)], frame_delay=0.25),  # ~12 s
        Reply(chunks=[f"Beta {n} of the second answer.\n\n" for n in range(1, 17)], frame_delay=0.25),
    )
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "Alpha 3 ")
    notebook.save()
    mid = front_end.saved(name, until=lambda nb: bool(nb.cells[1].outputs))
    findings.check(bool(mid.cells[1].outputs), "the file saved mid-stream has no output for the streaming cell")
    findings.extend(text_problems(mid, "mid-stream"))

    # The kernel streams on while the page is away; its shell channel says when the cell ended.
    cell_end = front_end.probe(name)
    try:
        if reloaded == "while-streaming":
            notebook.reload()
            assert not cell_end.answered(timeout=0.5), "the answer had ended before the page came back"
            assert cell_end.answered(timeout=60), "the first answer's cell never ended"
        else:
            assert cell_end.answered(timeout=60), "the first answer's cell never ended"
            notebook.reload()
    finally:
        cell_end.close()
    shown = wait_for_text(notebook, 1, lambda text: "out tokens" in text, timeout=20)
    notebook.screenshot(f"reloaded-{reloaded}")
    when = {"while-streaming": "while the answer streamed", "after-the-answer": "after the answer ended"}[reloaded]
    if findings.check("out tokens" in shown and "Alpha 48 of the first answer." in shown,
                      f"saved mid-stream and reloaded {when}, the cell never showed its whole answer and footer "
                      f"(20 s after the cell ended); it shows {shown[-300:]!r}"):
        findings.check(shown.startswith("Alpha 1 of the first answer."), f"the reloaded cell shows {shown[:200]!r}")
    findings.check(not trouble_in(shown), f"the reloaded cell reads {trouble_in(shown)}")

    # The next answer streams into its own cell only.
    ready = wait_until(lambda: notebook.kernel_status() == "connected:idle", timeout=20)
    if not findings.check(ready, f"after the reload and the stream's end, the page's kernel stays "
                                       f"{notebook.kernel_status()!r} (not idle): no cell can run"):
        findings.assert_none()
    notebook.run_cell(2)
    leaked: list[str] = []
    deadline = time.monotonic() + 30
    while "out tokens" not in notebook.output_text(2) and time.monotonic() < deadline:
        first = notebook.output_text(1)
        if "Beta" in first and not leaked:
            leaked.append(first)
        time.sleep(0.05)
    second = notebook.wait_for_output(2, "out tokens")
    first = notebook.output_text(1)
    findings.check(not leaked, f"the first cell showed the second cell's answer: {leaked[:1]!r}")
    findings.check("Beta" not in first, f"the first cell ends showing the second cell's answer: {first[-200:]!r}")
    findings.check("Beta 16 of the second answer." in second and "Alpha" not in second,
                   f"the second cell shows {second[-200:]!r}")
    notebook.screenshot(f"reloaded-{reloaded}-second-answer")

    notebook.save()
    final = front_end.saved(name, until=lambda nb: all(outputs for _, outputs in qwen_outputs(nb)))
    findings.extend(text_problems(final, "after both answers"))
    findings.assert_none()


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_a_kernel_restart_mid_stream_leaves_the_partial_answer_as_text(
    notebook: NotebookPage, open_page, front_end: FrontEnd, gateway: Gateway, how: str
) -> None:
    """↻ while an answer streams (or the kernel dies and the server restarts it): what the user
    last saw stays, as text, with a line saying the kernel restarted; saved and reopened, the
    partial answer shows and no widget error."""
    findings = Findings()
    name = front_end.notebook(f"{how}.ipynb", "%load_ext qwen_magic", "%%qwen\nCount slowly.")
    gateway.script(Reply(chunks=[f"word{n} " for n in range(400)], frame_delay=0.05))  # ~20 s
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "word20 ")
    if how == "restart":
        notebook.restart_kernel()
    else:
        front_end.kill_kernel(name)
        notebook.acknowledge_dialog()  # "The kernel appears to have died. It will restart automatically."
    notebook.wait_until_connected(idle=True)

    shown = wait_for_text(notebook, 1, RESTARTED.search, timeout=15)
    notebook.screenshot(f"{how}-mid-stream")
    findings.check(bool(RESTARTED.search(shown)),
                   f"after the restart the cell has no line saying the kernel restarted; it shows {shown[-300:]!r}")
    findings.check(shown.startswith("word0 word1 word2") and "word20 " in shown,
                   f"after the restart the partial answer is not shown; the cell shows {shown[:300]!r}")
    broken = notebook.cell(1).locator(".jupyter-widgets-disconnected").count()
    findings.check(broken == 0, f"after the restart the partial answer sits in {broken} disconnected widget "
                                f"views (shown with broken-link icons), not as text")
    findings.check(not trouble_in(shown), f"after the restart the cell reads {trouble_in(shown)}")
    assert "word399" not in shown, "the answer had ended before the restart: the test proves nothing"

    notebook.save()
    saved = front_end.saved(name, until=lambda nb: bool(nb.cells[1].outputs))
    findings.extend(text_problems(saved, "after the restart"))
    notebook.page.context.close()  # close the notebook; reopen it with the restarted kernel

    reopened = open_page()
    reopened.open(name)
    again = wait_for_text(reopened, 1, lambda text: "word20 " in text, timeout=15)
    reopened.screenshot(f"{how}-then-reopened")
    findings.check("word20 " in again and again.lstrip().startswith("word0"),
                   f"reopened after the restart, the cell does not show the partial answer; it shows {again[:300]!r}")
    findings.check(not trouble_in(again), f"reopened after the restart, the cell reads {again[:200]!r}")
    findings.assert_none()


# Widget views shown with ipywidgets' broken-link icon (no kernel behind them), in a cell.
BROKEN_LINK_ICONS_JS = r"""
(cellIndex) => {
  const cells = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell');
  const cell = cells[cellIndex];
  return cell ? [...cell.querySelectorAll('.jupyter-widgets-disconnected')]
    .filter((e) => getComputedStyle(e, '::before').display !== 'none').length : -1;
}
"""


def test_a_notebook_saved_mid_stream_then_reopened_after_a_restart_shows_the_text_it_saved(
    notebook: NotebookPage, open_page, front_end: FrontEnd, gateway: Gateway
) -> None:
    """Ctrl+S while an answer streams, close the page, restart the kernel, reopen: the cell
    shows the answer as far as it had come and a line saying it was still streaming, never
    "model not found"; saved again, the file holds that text and no widget."""
    findings = Findings()
    name = front_end.notebook("saved-mid-stream.ipynb", "%load_ext qwen_magic", "%%qwen\nTell a long story.")
    gateway.script(Reply(chunks=[f"Gamma {n} of the answer.\n\n" for n in range(1, 49)], frame_delay=0.25))  # ~12 s
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "Gamma 4 ")
    notebook.save()
    mid = front_end.saved(name, until=lambda nb: bool(nb.cells[1].outputs))
    findings.extend(text_problems(mid, "mid-stream"))
    notebook.page.context.close()
    cell_end = front_end.probe(name)
    try:
        assert not cell_end.answered(timeout=0.5), "the answer had ended before the page closed"
    finally:
        cell_end.close()
    front_end.api(f"kernels/{front_end.kernel_of(name)['id']}/restart", method="POST")

    reopened = open_page()
    reopened.open(name)
    shown = wait_for_text(reopened, 1, lambda text: "still streaming" in text or "Error displaying" in text,
                          timeout=30)
    reopened.screenshot("saved-mid-stream-reopened")
    findings.check(not trouble_in(shown), f"reopened after the restart, the cell reads {shown[:200]!r}")
    findings.check(shown.lstrip().startswith("Gamma 1 of the answer.") and "Gamma 4 of the answer." in shown,
                   f"reopened after the restart, the cell does not show the answer saved; it shows {shown[:300]!r}")
    findings.check("still streaming when this output was saved" in shown,
                   f"reopened after the restart, no line says the answer was still streaming: {shown[-300:]!r}")
    icons = reopened.page.evaluate(BROKEN_LINK_ICONS_JS, 1)
    findings.check(icons == 0, f"reopened after the restart, the answer shows {icons} broken-link icons")

    reopened.save()
    again = front_end.saved(name, until=lambda nb: "widgets" not in nb.metadata, timeout=10)
    outputs = again.cells[1].outputs
    kept = [sorted(output.get("data", {})) for output in outputs]
    findings.check(all("application/vnd.jupyter.widget-view+json" not in data for data in kept),
                   f"saved again from the reopened page, the cell keeps a widget view: {kept}")
    findings.check("widgets" not in again.metadata, "saved again, the file still keeps widget state")
    findings.check(any("Gamma 4 of the answer." in str(output.get("data", {}).get("text/html", ""))
                       for output in outputs), f"saved again, the file lost the answer's text: {kept}")
    findings.extend(text_problems(again, "reopened and saved again"))
    findings.assert_none()


def test_an_untrusted_notebook_keeps_the_footer_quiet(
    notebook: NotebookPage, open_page, front_end: FrontEnd, gateway: Gateway
) -> None:
    """An answer saved by a cell, opened from a file nobody trusted: its footer looks as it
    does where it was made (what the footer's look rests on survives sanitising), a quiet
    line smaller or lighter than the answer, not full-contrast body text."""
    name = front_end.notebook("made.ipynb", "%load_ext qwen_magic", "%%qwen\nSay something.")
    gateway.script(Reply(chunks=["The body of the answer, in plain words.\n\n", "A second paragraph."],
                         frame_delay=0.05))
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "out tokens")
    where_made = notebook.page.evaluate(MEASURE_JS, [1, ["out tokens"]]).get("out tokens")
    notebook.save()
    made = front_end.saved(name, until=lambda nb: bool(nb.cells[1].outputs))

    # The same output in a notebook the server never signed: untrusted when opened.
    untrusted = nbformat.v4.new_notebook()
    untrusted.metadata["kernelspec"] = dict(made.metadata["kernelspec"])
    untrusted.cells = [nbformat.v4.new_markdown_cell("Shared by a colleague."), made.cells[1]]
    nbformat.write(untrusted, front_end.root / "shared.ipynb")
    assert not front_end.trusted("shared.ipynb")

    reader = open_page()
    reader.open("shared.ipynb")
    reader.wait_for_output(1, "out tokens")
    seen = reader.page.evaluate(MEASURE_JS, [1, ["out tokens", "The body of the answer"]])
    reader.screenshot("untrusted-footer")
    footer, body = seen.get("out tokens"), seen.get("The body of the answer")
    assert where_made and footer and body, f"footer or answer not found: {where_made}, {seen}"

    def look(element: dict) -> str:
        shade = contrast(element["color"], element["background"], element["opacity"])
        return f"{element['fontSize']:g} px, {element['color']} (contrast {shade:.1f}:1)"

    footer_contrast = contrast(footer["color"], footer["background"], footer["opacity"])
    made_contrast = contrast(where_made["color"], where_made["background"], where_made["opacity"])
    body_contrast = contrast(body["color"], body["background"], body["opacity"])
    problems = []
    if abs(footer["fontSize"] - where_made["fontSize"]) > 0.5 or abs(footer_contrast - made_contrast) > 0.5:
        problems.append(f"the footer shows as {look(footer)} in the untrusted notebook but as "
                        f"{look(where_made)} where it was made")
    if not (footer["fontSize"] < body["fontSize"] * 0.95 or footer_contrast < body_contrast * 0.8):
        problems.append(f"the untrusted footer ({look(footer)}) is neither smaller nor lighter than the "
                        f"answer ({look(body)})")
    assert not problems, "in an untrusted notebook the footer is not quiet:\n" + "\n".join(problems)


def test_the_answer_keeps_its_typography_from_live_view_to_final_output(
    notebook: NotebookPage, front_end: FrontEnd, gateway: Gateway
) -> None:
    """The same paragraphs, measured mid-stream and at the end: same font size and line
    height, and each paragraph's height within 2 px (no jump when the answer finishes)."""
    name = front_end.notebook("type.ipynb", "%load_ext qwen_magic", "%%qwen\nWrite long paragraphs.")
    sentence = "the river kept its own counsel while the reeds leaned over the slow brown water "
    paragraphs = [f"Paragraph {n}: {sentence * 4}\n\n" for n in range(1, 15)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.4))  # ~5.6 s
    notebook.open(name)
    notebook.run_cell(0)
    notebook.run_cell(1)
    notebook.wait_for_output(1, "Paragraph 5:")
    needles = [f"Paragraph {n}:" for n in (1, 2, 3)]
    live = notebook.page.evaluate(MEASURE_JS, [1, needles])
    still_streaming = "out tokens" not in notebook.output_text(1)
    notebook.screenshot("typography-live")
    assert still_streaming, "the answer had finished before it could be measured mid-stream"
    notebook.wait_for_output(1, "out tokens")
    final = notebook.page.evaluate(MEASURE_JS, [1, needles])
    notebook.screenshot("typography-final")

    problems = []
    for needle in needles:
        before, after = live.get(needle), final.get(needle)
        if not before or not after:
            problems.append(f"{needle!r} not found (live: {before}, final: {after})")
            continue
        if abs(before["fontSize"] - after["fontSize"]) > 0.5 or before["lineHeight"] != after["lineHeight"]:
            problems.append(f"{needle!r} is {before['fontSize']} px / line height {before['lineHeight']} live, "
                            f"{after['fontSize']} px / {after['lineHeight']} at the end")
        if abs(before["height"] - after["height"]) > 2:
            problems.append(f"{needle!r} is {before['height']:.1f} px high live and {after['height']:.1f} px "
                            f"at the end")
    assert not problems, "the answer changes its typography when it finishes:\n" + "\n".join(problems)
