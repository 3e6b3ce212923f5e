"""The notebook as context, in a real IPython shell through the real SDK and the gateway:
%qwen fix, {In[n]}/{Out[n]}, --cells, --file, and values summarised to fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.context import FIX_SYSTEM, NO_ERROR
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.tokens import count_text

from .conftest import TEST_KEY, refusal, shown

FIXED = "The list has two items, so index 5 is past its end.\n\n```python\nrows = [1, 2]\nprint(rows[1])\n```"


def cell(shell, code: str):
    """A cell as a notebook runs it: numbered, in the input history (fix and --cells read it)."""
    return shell.run_cell(code, store_history=True)


def number_of_last_cell(shell) -> int:
    return shell.execution_count - 1


@pytest.fixture
def placed(shell, monkeypatch) -> list[tuple[str, bool]]:
    """What went into a new cell below (set_next_input), as the front end would receive it."""
    cells: list[tuple[str, bool]] = []
    monkeypatch.setattr(shell, "set_next_input", lambda text, replace=False: cells.append((text, replace)))
    return cells


@pytest.fixture
def no_earlier_error(monkeypatch) -> None:
    """No error left in sys.last_* by an earlier test of this process."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        monkeypatch.delattr(sys, name, raising=False)


# ---- %qwen fix

def test_fix_sends_the_failing_cell_its_error_and_traceback_and_puts_the_fix_below(
        shell, gateway: Gateway, placed, capsys) -> None:
    cell(shell, "def pick(rows, at):\n    return rows[at]")
    defined = number_of_last_cell(shell)
    assert not cell(shell, "rows = [1, 2]\npick(rows, 5)").success
    failed = number_of_last_cell(shell)
    shown(capsys)
    gateway.script(Reply(text=FIXED))

    assert cell(shell, "%qwen fix").success

    (request,) = gateway.requests
    system, user = request.messages
    assert system == {"role": "system", "content": FIX_SYSTEM}
    text = user["content"]
    assert f"Cell In [{failed}] raised an error." in text
    assert "```python\nrows = [1, 2]\npick(rows, 5)\n```" in text
    assert "The error: IndexError: list index out of range" in text
    # The traceback, innermost frame last, cells named as IPython names them, without colours.
    assert (f"Cell In [{failed}], line 2, in <module>\n    pick(rows, 5)\n"
            f"Cell In [{defined}], line 2, in pick\n    return rows[at]\nIndexError: list index out of range") in text
    assert "\x1b[" not in text and "interactiveshell.py" not in text
    # The corrected cell goes below, not run; the fix is a one-off.
    assert placed == [("rows = [1, 2]\nprint(rows[1])", False)]
    assert "one-off, not in a chat" in shown(capsys)
    chats = shell.magics_manager.registry["QwenMagic"].session.chats
    assert all(not chat.turns for chat in chats.values())


def test_fix_with_no_error_says_so_and_sends_nothing(shell, gateway: Gateway, no_earlier_error, capsys) -> None:
    outcome = cell(shell, "%qwen fix")
    assert outcome.success and str(outcome.result) == NO_ERROR
    assert outcome.result.count("\n") == 0
    outcome = cell(shell, "%%qwen --fix\nAnd explain it")
    assert str(outcome.result) == NO_ERROR
    assert gateway.requests == []


def test_an_error_before_the_extension_was_loaded_is_found_through_ipython(
        shell, gateway: Gateway, no_earlier_error) -> None:
    shell.run_line_magic("unload_ext", "qwen_magic")
    assert not cell(shell, "int('twelve')").success
    failed = number_of_last_cell(shell)
    shell.run_line_magic("load_ext", "qwen_magic")
    cell(shell, "%qwen fix --dry-run")
    assert gateway.requests == []
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert f"Cell In [{failed}] raised an error." in text and "```python\nint('twelve')\n```" in text
    assert "ValueError: invalid literal for int() with base 10: 'twelve'" in text


def test_a_failed_qwen_cell_does_not_replace_the_error_to_fix(shell, gateway: Gateway, capsys) -> None:
    assert not cell(shell, "{'a': 1}['b']").success
    failed = number_of_last_cell(shell)
    shown(capsys)
    refusal(shell, capsys, "%%qwen --max-cost 0.0000001\nA question that costs more than that")
    shell.run_cell("%%qwen --max-cost 0.0000001\nAgain, numbered", store_history=True)
    assert shell.run_cell("%qwen budget nonsense", store_history=True).error_in_exec is not None
    cell(shell, "%qwen fix")
    assert f"Cell In [{failed}] raised an error." in gateway.requests[-1].messages[-1]["content"]
    assert "KeyError: 'b'" in gateway.requests[-1].messages[-1]["content"]


def test_fix_cell_adds_its_filled_text_and_a_named_chat_keeps_the_turn(shell, gateway: Gateway, placed) -> None:
    assert not cell(shell, "total = sum(['1', 2])").success
    shell.user_ns["goal"] = "add the numbers"
    gateway.script(Reply(text=FIXED))
    assert cell(shell, "%%qwen --fix -c debug -m qwen-max\nI wanted to {goal}; keep {{braces}} in my code.").success
    request = gateway.requests[-1]
    assert request.model == "qwen-max"
    text = request.messages[-1]["content"]
    assert "TypeError: unsupported operand type(s) for +: 'int' and 'str'" in text
    assert text.endswith("I wanted to add the numbers; keep {{braces}} in my code.")
    chats = shell.magics_manager.registry["QwenMagic"].session.chats
    assert len(chats["debug"].turns) == 1 and chats["debug"].system == FIX_SYSTEM
    assert placed == [("rows = [1, 2]\nprint(rows[1])", False)]


def test_a_cell_with_braces_is_sent_as_written(shell, gateway: Gateway) -> None:
    shell.user_ns["data"] = "FILLED"
    assert not cell(shell, "data = {'k': 1}\nprint(f'{data}')\ndata['missing']").success
    cell(shell, "%qwen fix")
    assert "print(f'{data}')" in gateway.requests[-1].messages[-1]["content"]


def test_fix_after_the_cell_ran_cleanly_says_there_is_nothing_to_fix(shell, gateway: Gateway) -> None:
    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult

    watch = shell.magics_manager.registry["QwenMagic"].errors
    failing = ExecutionResult(ExecutionInfo("1/0", True, False, True, "cell-a"))
    failing.error_in_exec, failing.execution_count = ZeroDivisionError("division by zero"), 7
    watch(failing)
    clean = ExecutionResult(ExecutionInfo("1/1", True, False, True, "cell-a"))
    clean.execution_count = 8
    watch(clean)
    outcome = cell(shell, "%qwen fix")
    assert str(outcome.result) == ("No error to fix: the cell that raised the last one (In [7]) "
                                   "has run without error since.")
    assert gateway.requests == []


def test_traceback_folds_library_frames_and_keeps_the_innermost_within_its_limit(shell, gateway: Gateway) -> None:
    pytest.importorskip("pandas")
    cell(shell, "import pandas as pd\nframe = pd.DataFrame({'a': [1]})")
    assert not cell(shell, "frame['missing']").success
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert "frame(s) inside installed packages (pandas) …]" in text
    assert "KeyError: 'missing'" in text
    # Recursion through one frame is said once, as Python says it.
    cell(shell, "def down(n):\n    if n == 0:\n        raise RuntimeError('bottom')\n    return down(n - 1)")
    down = number_of_last_cell(shell)
    assert not cell(shell, "down(400)").success
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert (f"Cell In [{down}], line 4, in down\n    return down(n - 1)\n[Previous frame repeated 399 more time(s)]\n"
            f"Cell In [{down}], line 3, in down\n    raise RuntimeError('bottom')\nRuntimeError: bottom") in text
    # Deep recursion through two frames: the outer frames go, the innermost stay, and the footer says so.
    cell(shell, "def ping(n):\n    if n == 0:\n        raise RuntimeError('bottom')\n    return pong(n - 1)\n"
                "def pong(n):\n    return ping(n)")
    assert not cell(shell, "ping(400)").success
    cell(shell, "%qwen fix -o fixed")
    text = gateway.requests[-1].messages[-1]["content"]
    trace = text.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert count_text(trace) <= 1500
    assert trace.startswith("[… ") and "outer frame(s) left out" in trace.splitlines()[0]
    assert trace.endswith("raise RuntimeError('bottom')\nRuntimeError: bottom")
    assert any("outermost frame(s) were left out" in note for note in shell.user_ns["fixed"].notes)


def test_colour_codes_in_an_error_message_are_stripped(shell, gateway: Gateway) -> None:
    assert not cell(shell, "raise ValueError('\\x1b[31mred\\x1b[0m alert')").success
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert "ValueError: red alert" in text and "\x1b" not in text


def test_a_syntax_error_names_its_cell(shell, gateway: Gateway) -> None:
    assert not cell(shell, "for x in range(3)\n    print(x)").success
    failed = number_of_last_cell(shell)
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert f"Cell In [{failed}], line 1" in text and "SyntaxError: expected ':'" in text


def test_fix_options_are_checked(shell, gateway: Gateway, capsys) -> None:
    assert "%qwen fix takes -m MODEL, -c CHAT, -o VAR and --dry-run" in refusal(shell, capsys, "%qwen fix --nope")
    assert "-m needs a value" in refusal(shell, capsys, "%qwen fix -m")


# ---- outputs and cells

class Chart:
    """An output that is a picture, with a text repr beside it."""

    def _repr_png_(self) -> bytes:
        return b"\x89PNG\r\n\x1a\n" + bytes(16)

    def __repr__(self) -> str:
        return "<Chart object>"


def test_outputs_fill_with_their_text_and_images_are_named(shell, gateway: Gateway) -> None:
    shell.user_ns["Chart"] = Chart
    cell(shell, "6 * 7")
    number = number_of_last_cell(shell)
    cell(shell, "Chart()")
    chart = number_of_last_cell(shell)
    cell(shell, f"%%qwen --no-history\nOut: {{Out[{number}]}}; chart: {{Out[{chart}]}}; code: {{In[{number}]}}")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text == "Out: 42; chart: [an image (image/png), not sent: Chart]; code: 6 * 7"


def test_a_matplotlib_figure_is_named_by_its_axes_not_pasted(shell, gateway: Gateway) -> None:
    pytest.importorskip("matplotlib")
    cell(shell, "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                "fig, ax = plt.subplots()\nax.plot([1, 2, 3])\nax.set_title('Sales')\nax.set_xlabel('month')")
    cell(shell, "fig")
    number = number_of_last_cell(shell)
    cell(shell, f"%%qwen --no-history\n{{Out[{number}]}} and {{_}}")
    text = gateway.requests[-1].messages[-1]["content"]
    expected = "[an image (image/png), not sent: a matplotlib figure, 640×480 px, 1 axes (title 'Sales', x axis 'month')]"
    assert text == f"{expected} and {expected}"
    assert "<Figure size" not in text


def test_rich_objects_fill_with_their_markdown(shell, gateway: Gateway) -> None:
    class Report:
        def _repr_markdown_(self) -> str:
            return "**Q3**: up 4%"

    shell.user_ns["report"] = Report()
    cell(shell, "%%qwen --no-history\nSummarise {report}")
    assert gateway.requests[-1].messages[-1]["content"] == "Summarise **Q3**: up 4%"


def test_an_object_with_its_own_str_fills_with_it(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="West Lake is in Hangzhou."))
    cell(shell, "%%qwen -o answer --no-history\nWhere is West Lake?")
    cell(shell, "%%qwen --no-history\nTranslate: {answer}")
    assert gateway.requests[-1].messages[-1]["content"] == "Translate: West Lake is in Hangzhou."


def test_cells_sends_the_last_code_cells_with_their_outputs(shell, gateway: Gateway) -> None:
    cell(shell, "prices = [3, 4, 5]")
    first = number_of_last_cell(shell)
    cell(shell, "%%qwen --no-history\nnot context: a question of its own")
    cell(shell, "sum(prices)")
    second = number_of_last_cell(shell)
    outcome = cell(shell, "%%qwen --cells 2 --dry-run\nIs the total right?")
    assert gateway.requests[-1].messages[-1]["content"] == "not context: a question of its own"  # nothing new sent
    (message,) = [m for m in outcome.result.preflight.messages if m["role"] == "user"]
    assert message["content"] == (
        f"Earlier cells of this notebook:\n\nIn [{first}]:\n\n```python\nprices = [3, 4, 5]\n```\n\n"
        f"In [{second}]:\n\n```python\nsum(prices)\n```\n\nOut [{second}]:\n\n```text\n12\n```\n\nIs the total right?"
    )
    assert "Earlier cells of this notebook" in pretty(outcome.result)
    cell(shell, f"%%qwen --cells {first}-{first}\nAnd this one?")
    assert gateway.requests[-1].messages[-1]["content"].startswith(
        f"Earlier cells of this notebook:\n\nIn [{first}]:\n\n```python\nprices = [3, 4, 5]\n```\n\nAnd this one?")


def test_cell_outputs_are_cut_to_about_500_tokens(shell, gateway: Gateway) -> None:
    cell(shell, "'word ' * 5000")
    cell(shell, "%%qwen --cells 1\nWhat is it?")
    text = gateway.requests[-1].messages[-1]["content"]
    assert "characters cut …]" in text and count_text(text) < 700


@pytest.mark.parametrize("spec", ["0", "x", "7-3", "-2"])
def test_a_bad_cells_value_is_one_line(shell, gateway: Gateway, capsys, spec) -> None:
    assert "--cells takes a number of cells" in refusal(shell, capsys, f"%%qwen --cells={spec}\nQ")
    assert gateway.requests == []


# ---- values that fill well

def test_a_large_data_frame_fills_within_the_limit_and_the_footer_says_so(shell, gateway: Gateway, capsys) -> None:
    pd = pytest.importorskip("pandas")
    shell.user_ns["df"] = pd.DataFrame({"city": ["杭州", "北京"] * 5000, "sales": range(10_000),
                                        "price": [1.5] * 10_000})
    cell(shell, "%%qwen\nWhich city sells more? {df}")
    text = gateway.requests[-1].messages[-1]["content"]
    assert count_text(text) <= 2000
    assert text.startswith("Which city sells more? pandas DataFrame: 10,000 rows × 3 columns\n"
                           "Columns (dtype): city (")
    assert "| 9999 | 北京 | 9999 | 1.5 |" in text and "| 0 | 杭州 | 0 | 1.5 |" in text
    assert "(9,990 rows not shown)" in text
    footer = shown(capsys)
    assert ("{df} was summarised (a pandas DataFrame of 10,000 rows × 3 columns: the first and last 5 rows); "
            "{df!full} sends it whole.") in footer


def test_full_sends_the_whole_value_checked_against_the_input_limit(shell, gateway: Gateway, capsys) -> None:
    pd = pytest.importorskip("pandas")
    shell.user_ns["df"] = pd.DataFrame({"n": range(1000)})
    cell(shell, "%%qwen --no-history\n{df!full}")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith(",n\n0,0\n1,1\n") and text.endswith("999,999")
    shell.user_ns["df"] = pd.DataFrame({"n": range(300_000)})
    line = refusal(shell, capsys, "%%qwen -m qwen-flash --no-history\n{df!full}")
    assert line.startswith("UsageError: Refused, nothing sent: this request has") and "over qwen-flash's limit of" in line
    assert len(gateway.requests) == 1


def test_a_polars_data_frame_is_summarised_too(shell, gateway: Gateway, capsys) -> None:
    pl = pytest.importorskip("polars")
    shell.user_ns["df"] = pl.DataFrame({"city": ["杭州", "北京"] * 5000, "n": range(10_000)})
    cell(shell, "%%qwen --no-history\n{df}")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith("polars DataFrame: 10,000 rows × 2 columns\nColumns (dtype): city (String), n (Int64)")
    assert "| 北京 | 9999 |" in text and count_text(text) <= 2000
    assert "{df} was summarised (a polars DataFrame of 10,000 rows × 2 columns" in shown(capsys)


def test_the_dry_run_says_a_value_was_summarised_and_the_limit_is_a_setting(shell, gateway: Gateway) -> None:
    shell.user_ns["log"] = "line of a long log\n" * 3000
    shell.run_line_magic("config", "QwenMagic.max_value_tokens = 200")
    outcome = cell(shell, "%%qwen --dry-run\nWhat failed? {log}")
    shown_text = pretty(outcome.result)
    assert "{log} was summarised (57,000 characters, of which the first and last" in shown_text
    content = outcome.result.preflight.messages[-1]["content"]
    assert count_text(content) < 260 and "characters cut …]" in content
    assert gateway.requests == []


def test_numpy_arrays_long_lists_and_dicts_are_summarised(shell, gateway: Gateway) -> None:
    numpy = pytest.importorskip("numpy")
    shell.user_ns.update(grid=numpy.arange(60_000).reshape(300, 200), rows=[{"id": i} for i in range(5000)],
                         small=[1, 2, 3])
    cell(shell, "%%qwen --no-history\n{grid}\n{rows}\n{small}")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith("numpy array: shape (300, 200), dtype int64\nmin 0, max 59999, mean 29999.5\n[[    0")
    assert '[{"id": 0}, {"id": 1}' in text and '"… 4,950 more items"' in text
    assert text.endswith("\n[1, 2, 3]")


# ---- files

@pytest.fixture
def folder(tmp_path: Path, monkeypatch) -> Path:
    """The notebook's folder: the kernel's working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_text_file_goes_before_the_question_from_the_notebooks_folder(shell, gateway: Gateway, folder) -> None:
    (folder / "notes.md").write_text("# Notes\nTotal {should} stay as written.", encoding="utf-8")
    shell.user_ns["should"] = "FILLED"
    (folder / "small.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    cell(shell, "%%qwen --file notes.md --file small.csv\nSummarise.")
    assert gateway.requests[-1].messages[-1]["content"] == (
        "File notes.md:\n\n```markdown\n# Notes\nTotal {should} stay as written.\n```\n\n"
        "File small.csv:\n\n```csv\na,b\n1,2\n```\n\nSummarise."
    )


def test_a_large_csv_is_summarised_like_a_data_frame(shell, gateway: Gateway, folder, capsys) -> None:
    lines = ["city,sales,note"] + [f"{'杭州' if i % 2 else '北京'},{i},n{i}" for i in range(10_000)]
    (folder / "sales.csv").write_text("\n".join(lines), encoding="utf-8")
    cell(shell, "%%qwen --file sales.csv\nWhich city sells more?")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith("File sales.csv, summarised:\n\nCSV file: 10,000 rows × 3 columns\n"
                           "Columns (dtype): city (text), sales (int), note (text)")
    assert "| 北京 | 0 | n0 |" in text and "| 杭州 | 9999 | n9999 |" in text and count_text(text) < 2100
    assert "--file sales.csv was summarised (a CSV file of 10,000 rows × 3 columns: the first and last 5 rows)." \
        in shown(capsys)


def test_files_that_cannot_be_sent_are_refused_in_one_line(shell, gateway: Gateway, folder, capsys) -> None:
    (folder / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "data").mkdir()
    (folder / "null-link").symlink_to("/dev/null")
    (folder / "env-link").symlink_to("/proc/self/environ")
    assert "--file image.bin: not a text file (its content is binary); nothing was sent." in \
        refusal(shell, capsys, "%%qwen --file image.bin\nWhat is it?")
    assert f"--file missing.txt: no such file (relative paths are read from {folder})." in \
        refusal(shell, capsys, "%%qwen --file missing.txt\nWhat is it?")
    assert "--file data: a folder, not a file" in refusal(shell, capsys, "%%qwen --file data\nQ")
    assert "--file null-link: not a regular file" in refusal(shell, capsys, "%%qwen --file null-link\nQ")
    assert "--file env-link: not a regular file" in refusal(shell, capsys, "%%qwen --file env-link\nQ")
    assert "--file 'a\\x00b': no such file" in refusal(shell, capsys, "%%qwen --file a\x00b\nQ")
    assert gateway.requests == []


def test_a_file_over_the_models_input_limit_is_refused(shell, gateway: Gateway, folder, capsys) -> None:
    (folder / "big.log").write_text("entry 12345 failed\n" * 2000, encoding="utf-8")
    shell.run_line_magic("config", "QwenMagic.models = {'tiny': {'input': 1.0, 'output': 2.0, 'max_input': 5000}}")
    line = refusal(shell, capsys, "%%qwen -m tiny --file big.log\nWhy?")
    assert "--file big.log: about" in line and "over tiny's input limit of 5,000; nothing was sent." in line
    assert gateway.requests == []


def test_home_is_expanded_and_the_key_never_shows(shell, gateway: Gateway, isolated_env: Path, capsys) -> None:
    (isolated_env / "todo.txt").write_text("buy tea", encoding="utf-8")
    cell(shell, "%%qwen --file ~/todo.txt\nWhat is on the list?")
    assert gateway.requests[-1].messages[-1]["content"].startswith("File ~/todo.txt:\n\n```text\nbuy tea\n```")
    assert TEST_KEY not in shown(capsys)


def test_loading_the_extension_imports_no_data_library() -> None:
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        libraries = ("pandas", "numpy", "polars", "matplotlib", "pypdf")
        before = {m for m in libraries if m in sys.modules}  # the test shell may bring some itself
        ip.run_line_magic("load_ext", "qwen_magic")
        ip.run_cell("x = 1", store_history=True)
        loaded = {m for m in libraries if m in sys.modules} - before
        assert not loaded, loaded
        assert "pandas" not in before
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ---- in a real kernel, as a front end sees it

@pytest.fixture(scope="module")
def kernel(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory):
    from .kernel_harness import KernelSession, kernel_env

    folder = tmp_path_factory.mktemp("notebook")
    env = kernel_env(folder, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url)
    session = KernelSession(env, cwd=folder)
    session.folder = folder
    ran = session.execute("%load_ext qwen_magic")
    assert ran.status == "ok", ran.outputs
    yield session
    session.shutdown()


def run_in(kernel, code: str):
    execution = kernel.execute(code)
    assert TEST_KEY not in repr([m.content for m in execution.messages])
    return execution


def shown_text(execution) -> str:
    return "\n".join(o.get("text") or o.get("data", {}).get("text/plain", "") for o in execution.outputs)


@pytest.mark.kernel
def test_kernel_fix_after_an_index_error_and_none_before(kernel, gateway: Gateway) -> None:
    # Kept first in this module: the kernel has raised nothing yet.
    nothing = run_in(kernel, "%qwen fix")
    assert nothing.status == "ok" and shown_text(nothing).strip() == NO_ERROR
    assert gateway.requests == []

    failing = run_in(kernel, "rows = [1, 2]\nrows[5]")
    assert failing.status == "error" and failing.error["ename"] == "IndexError"
    number = failing.reply["execution_count"]
    gateway.script(Reply(text=FIXED))
    fixed = run_in(kernel, "%qwen fix")
    assert fixed.status == "ok", fixed.outputs
    (request,) = gateway.requests
    text = request.messages[-1]["content"]
    assert request.messages[0]["content"] == FIX_SYSTEM
    assert f"Cell In [{number}] raised an error.\n\nThe cell:\n\n```python\nrows = [1, 2]\nrows[5]\n```" in text
    assert (f"```text\nCell In [{number}], line 2, in <module>\n    rows[5]\nIndexError: list index out of range\n```"
            in text), text
    assert "ipykernel" not in text and "\x1b[" not in text
    # The corrected cell is offered below, not run.
    assert {"source": "set_next_input", "text": "rows = [1, 2]\nprint(rows[1])", "replace": False} in [
        {key: p.get(key) for key in ("source", "text", "replace")} for p in fixed.reply["payload"]]
    (answer,) = [o for o in fixed.outputs if o["output_type"] == "display_data"]
    assert "one-off, not in a chat" in answer["data"]["text/markdown"]


@pytest.mark.kernel
def test_kernel_outputs_fill_with_text_and_a_figure_is_named(kernel, gateway: Gateway) -> None:
    number = run_in(kernel, "2 ** 10").reply["execution_count"]
    code = ("class Chart:\n    def _repr_png_(self):\n        return b'\\x89PNG\\r\\n\\x1a\\n' + bytes(16)\n"
            "    def __repr__(self):\n        return '<Chart object>'\nChart()")
    try:
        import matplotlib  # noqa: F401

        code = ("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\n"
                "ax.set_title('Sales')\nplt.close(fig)\nfig")
        expected = "[an image (image/png), not sent: a matplotlib figure, "
    except ImportError:
        expected = "[an image (image/png), not sent: Chart]"
    picture = run_in(kernel, code)
    assert "image/png" in picture.outputs[-1]["data"]
    figure = picture.reply["execution_count"]
    assert run_in(kernel, f"%%qwen --no-history\n{{Out[{number}]}} / {{Out[{figure}]}}").status == "ok"
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith(f"1024 / {expected}") and "<Figure size" not in text


@pytest.mark.kernel
def test_kernel_data_frame_cells_and_files(kernel, gateway: Gateway) -> None:
    pytest.importorskip("pandas")
    first = run_in(kernel, "import pandas as pd\ndf = pd.DataFrame({'n': range(10_000), 'sq': [i * i for i in range(10_000)]})")
    shape = run_in(kernel, "df.shape")
    assert run_in(kernel, "%%qwen --no-history\nDescribe {df}").status == "ok"
    text = gateway.requests[-1].messages[-1]["content"]
    assert count_text(text) <= 2000 and "pandas DataFrame: 10,000 rows × 2 columns" in text
    assert "| 9999 | 9999 | 99980001 |" in text

    dry = run_in(kernel, "%%qwen --cells 2 --dry-run\nWhat is the shape?")
    plain = shown_text(dry)
    numbers = first.reply["execution_count"], shape.reply["execution_count"]
    assert f"In [{numbers[0]}]:" in plain and f"In [{numbers[1]}]:" in plain and f"Out [{numbers[1]}]:" in plain
    assert "(10000, 2)" in plain and "Dry run: nothing was sent." in plain

    folder = kernel.folder
    (folder / "sales.csv").write_text("\n".join(["city,n"] + [f"c{i},{i}" for i in range(5000)]), encoding="utf-8")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    sent = run_in(kernel, "%%qwen --no-history --file sales.csv\nWhich city is last?")
    assert sent.status == "ok"
    assert gateway.requests[-1].messages[-1]["content"].startswith(
        "File sales.csv, summarised:\n\nCSV file: 5,000 rows × 2 columns")
    requests = len(gateway.requests)
    for name, message in (("photo.jpg", "not a text file (its content is binary)"), ("gone.csv", "no such file")):
        refused = run_in(kernel, f"%%qwen --file {name}\nQ")
        assert refused.status == "error" and refused.error is None  # no traceback shown
        (line,) = [o["text"] for o in refused.outputs if o["output_type"] == "stream"]
        assert line.startswith(f"UsageError: --file {name}: ") and message in line and line.count("\n") == 1
    assert len(gateway.requests) == requests


def _pdf_with_text(text: str) -> bytes:
    """A one-page PDF whose page shows ``text`` (written by hand: no PDF library needed)."""
    stream = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_a_pdf_is_sent_as_its_text_with_pypdf(shell, gateway: Gateway, folder) -> None:
    pytest.importorskip("pypdf")
    (folder / "report.pdf").write_bytes(_pdf_with_text("Revenue rose in Hangzhou"))
    cell(shell, "%%qwen --file report.pdf\nWhat rose?")
    assert gateway.requests[-1].messages[-1]["content"] == (
        "File report.pdf:\n\n```\n[page 1]\nRevenue rose in Hangzhou\n```\n\nWhat rose?")


def test_a_pdf_without_pypdf_is_refused_in_one_line(shell, gateway: Gateway, folder, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if it were not installed
    (folder / "report.pdf").write_bytes(_pdf_with_text("Revenue"))
    assert "--file report.pdf: a PDF; install pypdf (pip install pypdf) to send its text." in \
        refusal(shell, capsys, "%%qwen --file report.pdf\nWhat rose?")
    assert gateway.requests == []


def test_a_cell_without_a_prompt_number_is_named_plainly(shell, gateway: Gateway, no_earlier_error) -> None:
    # A cell run outside the history (as a tool or an extension may run one) has no In [n].
    assert not shell.run_cell("[1, 2, 3][10]", store_history=False).success
    cell(shell, "%qwen fix")
    text = gateway.requests[-1].messages[-1]["content"]
    assert text.startswith("A cell raised an error.") and "IndexError: list index out of range" in text
