"""``%%qwen`` and ``%qwen``: parse, delegate, return. The work is in engine and commands."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import kwds
from traitlets import Bool, Dict, Enum, Float, Int, TraitError, Unicode, observe, validate

from . import magic_help
from .i18n import N_, _
from .i18n import use as use_language
from .options import CellOptions, cell_arguments, cell_options, has_control_characters, url_problem

if TYPE_CHECKING:  # pragma: no cover
    from .engine import QwenSession, Settings


@magics_class
class QwenMagic(Magics):
    """Ask Qwen models from IPython and Jupyter (settings: ``%config QwenMagic``)."""

    model = Unicode("qwen-plus", help=N_("Model used when a cell gives no -m/--model.")).tag(config=True)
    system = Unicode(
        None, allow_none=True, help=N_("Default system prompt of a new chat (None: the model's own).")
    ).tag(config=True)
    display = Enum(
        ["auto", "widget", "markdown", "text"],
        default_value="auto",
        help=N_(
            "How answers stream: auto (a widget in JupyterLab and Notebook 7, Markdown updates "
            "where no front end sent the cell, text in a terminal), widget, "
            "markdown (plain display updates, no widgets) or text (printed)."
        ),
    ).tag(config=True)
    timeout = Float(
        None,
        allow_none=True,
        help=N_("Seconds to wait for data before giving up (None: dashscope's setting, 300 s)."),
    ).tag(config=True)
    base_url = Unicode(
        None,
        allow_none=True,
        help=N_("DashScope endpoint, e.g. http://127.0.0.1:8765/api/v1 (None: dashscope's setting)."),
    ).tag(config=True)
    protocol = Enum(
        ["native", "openai"],
        default_value="native",
        help=N_("Wire protocol: DashScope native, or the OpenAI-compatible mode."),
    ).tag(config=True)
    budget = Float(
        None,
        allow_none=True,
        help=N_("Session budget in the region's currency (yuan in Beijing, US dollars in Singapore): a call "
        "whose worst case would pass it is refused (None: no budget)."),
    ).tag(config=True)
    max_retries = Int(
        3, help=N_("Retries of a rate-limited or failed call before any text was shown (0: none).")
    ).tag(config=True)
    max_history_tokens = Int(
        None,
        allow_none=True,
        help=N_("Most tokens of chat history a request carries; older turns are left out (None: the model's limit)."),
    ).tag(config=True)
    store_path = Unicode(
        None,
        allow_none=True,
        help=N_("The history file (SQLite). None: QWEN_MAGIC_STORE, or history.sqlite3 in the user data directory."),
    ).tag(config=True)
    stream = Bool(True, help=N_("Stream answers as they come (False: wait for the whole answer).")).tag(config=True)
    model_aliases = Dict(
        help=N_(
            "Names of models on other servers mapped to catalog entries for limits and prices, "
            "e.g. {'Qwen/Qwen2.5-7B-Instruct': 'my-vllm-qwen'} (add that entry with QwenMagic.models)."
        ),
    ).tag(config=True)
    models = Dict(
        help=N_(
            "Catalog overrides and additions, e.g. {'my-model': {'input': 1.0, 'output': 2.0, "
            "'max_input': 30000}} (prices per 1M tokens in the region's currency, yuan in Beijing and US "
            "dollars in Singapore; qpm/tpm set rate limits)."
        ),
    ).tag(config=True)

    max_value_tokens = Int(
        2000,
        help=N_("Most tokens a {name} in a cell is filled with: a larger DataFrame, array, string or collection "
        "is summarised ({name!full} sends it whole)."),
    ).tag(config=True)

    @validate("max_value_tokens")
    def _valid_value_tokens(self, proposal: dict[str, Any]) -> int:
        if not 50 <= proposal["value"] <= 1_000_000:
            raise TraitError(_("QwenMagic.max_value_tokens must be between 50 and 1,000,000."))
        return proposal["value"]

    concurrency = Int(8, help=N_("--map: most requests in flight at once (--concurrency N for one cell).")).tag(config=True)

    @validate("concurrency")
    def _valid_concurrency(self, proposal: dict[str, Any]) -> int:
        from .options import MAX_CONCURRENCY

        if not 1 <= proposal["value"] <= MAX_CONCURRENCY:
            raise TraitError(_("QwenMagic.concurrency must be from 1 to {most}.").format(most=MAX_CONCURRENCY))
        return proposal["value"]

    region = Unicode(
        None,
        allow_none=True,
        help=N_(
            "The DashScope region whose prices and currency apply: 'beijing' (yuan) or 'singapore' "
            "(US dollars). None: from the base URL's host (dashscope-intl.aliyuncs.com is Singapore), "
            "else DASHSCOPE_REGION, else Beijing."
        ),
    ).tag(config=True)
    cache = Bool(
        False,
        help=N_("Mark each chat's stable prefix for the explicit context cache, as --cache does (models that have it)."),
    ).tag(config=True)
    reservation_timeout = Float(
        1800.0,
        help=N_(
            "Seconds after which a spending-limit reservation that no kernel settled is released "
            "(a kernel that died on another machine; on this one, a dead kernel's is released at once)."
        ),
    ).tag(config=True)

    @validate("region")
    def _valid_region(self, proposal: dict[str, Any]) -> str | None:
        from .regions import REGIONS, region_named

        value = proposal["value"]
        if value is None:
            return None
        region = region_named(value)
        if region is None:
            raise TraitError(_("QwenMagic.region must be one of {regions} (or None), not {value}.").format(
                regions=", ".join(REGIONS), value=repr(value)))
        return region.key

    @validate("reservation_timeout")
    def _valid_reservation_timeout(self, proposal: dict[str, Any]) -> float:
        if not 0 < proposal["value"] < math.inf:
            raise TraitError(_("QwenMagic.reservation_timeout must be a positive, finite number of seconds."))
        return proposal["value"]

    language = Enum(
        ["auto", "zh", "en"],
        default_value="auto",
        help=N_(
            "Language of what qwen_magic prints (footers, refusals, errors, tables, help): "
            "zh (Simplified Chinese), en (English), or auto (the kernel's locale: any zh* in "
            "LC_ALL, LC_MESSAGES, LANG or LANGUAGE is Chinese, anything else English)."
        ),
    ).tag(config=True)

    @observe("language")
    def _use_language(self, change: dict[str, Any]) -> None:
        # At once, so that the next output (a command's table, %%qwen? too) is in the new language.
        self._speak(change["new"])

    def _speak(self, setting: str) -> None:
        """Print in the language ``setting`` names, and show ``%%qwen?`` in it."""
        language = use_language(setting)
        magic_help.document(QwenMagic.qwen, language)
        magic_help.describe_settings(QwenMagic, language)

    @validate("model")
    def _valid_model(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"].strip()
        if not value:
            raise TraitError(_("QwenMagic.model needs a model name, such as 'qwen-plus'."))
        if has_control_characters(value):
            raise TraitError(_("QwenMagic.model: {value} has control characters; no model name does.").format(
                value=repr(value)))
        return value

    @validate("base_url")
    def _valid_base_url(self, proposal: dict[str, Any]) -> str | None:
        value = proposal["value"]
        problem = None if value is None else url_problem(value)
        if problem:
            raise TraitError(_("QwenMagic.base_url {value}: {problem}.").format(value=repr(value), problem=problem))
        return value

    @validate("timeout", "budget")
    def _valid_positive(self, proposal: dict[str, Any]) -> float | None:
        value = proposal["value"]
        if value is not None and not (0 < value < math.inf):  # nan, inf and 0 too
            raise TraitError(_("QwenMagic.{name} must be a positive, finite number.").format(
                name=proposal["trait"].name))
        return value

    @validate("max_history_tokens")
    def _valid_history_tokens(self, proposal: dict[str, Any]) -> int | None:
        if proposal["value"] is not None and proposal["value"] < 0:
            raise TraitError(_("QwenMagic.max_history_tokens must be 0 or more."))
        return proposal["value"]

    @validate("max_retries")
    def _valid_retries(self, proposal: dict[str, Any]) -> int:
        if not 0 <= proposal["value"] <= 10:
            raise TraitError(_("QwenMagic.max_retries must be between 0 and 10."))
        return proposal["value"]

    @validate("models")
    def _valid_models(self, proposal: dict[str, Any]) -> dict[str, Any]:
        # Checked when set, so a mistake shows at %config, not at the next cell.
        from .catalog import CatalogError, builtin_catalog

        try:
            builtin_catalog().with_overrides(proposal["value"], "QwenMagic.models")
        except CatalogError as error:
            raise TraitError(str(error)) from None
        return proposal["value"]

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._session: QwenSession | None = None
        from .lasterror import ErrorWatch

        # The last cell that raised, for %qwen fix (a few lines of plain Python per cell).
        self.errors = ErrorWatch()
        if shell is not None:
            shell.events.register("post_run_cell", self.errors)
        # %%qwen? in the locale's language from the start (English needs no catalog: nothing is loaded).
        self._speak(self.language)

    @property
    def session(self) -> "QwenSession":
        """The kernel's state, built on first use: %load_ext imports none of the engine."""
        if self._session is None:
            from .engine import QwenSession

            self._session = QwenSession()
        return self._session

    def settings(self) -> "Settings":
        from .engine import Settings

        return Settings(
            model=self.model,
            system=self.system,
            display=self.display,
            timeout=self.timeout,
            base_url=self.base_url,
            protocol=self.protocol,
            budget=self.budget,
            max_retries=self.max_retries,
            models=dict(self.models),
            max_history_tokens=self.max_history_tokens,
            store_path=self.store_path,
            stream=self.stream,
            model_aliases=dict(self.model_aliases),
            max_value_tokens=self.max_value_tokens,
            concurrency=self.concurrency,
            region=self.region,
            cache=self.cache,
            reservation_timeout=self.reservation_timeout,
        )

    @cell_arguments
    @kwds(description=magic_help.description())
    @line_cell_magic
    def qwen(self, line: str, cell: str | None = None) -> Any:
        # Its help (%%qwen?) is magic_help.description() and the options, in the current language.
        self._speak(self.language)  # auto follows the locale, which %env may have changed
        self.session.notebook = self.notebook_key()
        if cell is None:
            from .commands import run_command

            return run_command(self, line)
        options = cell_options(self.qwen, line)
        context = self._notebook_context()
        if options.fix:
            nothing = context.nothing_to_fix()
            if nothing is not None:  # said in one line; nothing is sent
                from .commands import Message

                return Message(nothing)
        if options.map is not None:
            return self._map(cell, options)
        with self._keeping(options.out):
            result = self.session.ask(
                cell,
                options,
                self.settings(),
                cell_id=self._cell_id(),
                cell_label=f"In [{self._prompt_number()}]",
                in_kernel=getattr(self.shell, "kernel", None) is not None,
                display=_display,
                namespace=self._namespace(),
                context=context,
            )
        if options.dry_run:
            return result
        if options.out:
            self.shell.user_ns[options.out] = result
        if result.code is not None:
            # As %load does: the code goes into a new cell below, ready to run.
            self.shell.set_next_input(result.code, replace=False)
        if result.format_error is not None:
            from .engine import QwenFormatError

            raise QwenFormatError(result.format_error, kept_in=options.out)
        return None

    def _map(self, cell: str, options: CellOptions) -> Any:
        """``--map NAME``: one request per row of the collection; the work is in jobs."""
        from .jobs.job import run_map

        with self._keeping(options.out):
            result = run_map(self.session, cell, options, self.settings(), namespace=self.shell.user_ns,
                             cell_label=f"In [{self._prompt_number()}]",
                             in_kernel=getattr(self.shell, "kernel", None) is not None, display=_display)
        if options.dry_run:
            return result
        if options.out:
            self.shell.user_ns[options.out] = result
        return None

    @contextmanager
    def _keeping(self, out: str | None) -> Iterator[None]:
        """``-o VAR`` gets what a failed or interrupted answer or job kept, before the error shows."""
        try:
            yield
        except BaseException as error:
            partial = getattr(error, "result", None)
            if out and partial is not None:
                self.shell.user_ns[out] = partial
            raise

    def notebook_key(self) -> str:
        """The notebook's identity for the history: its path, as Jupyter names it."""
        name = os.environ.get("JPY_SESSION_NAME") or self.shell.user_ns.get("__session__")
        if name:
            return str(name)
        # Terminal IPython: one history per working directory.
        return f"ipython:{os.getcwd()}"

    def _prompt_number(self) -> int:
        """The running cell's prompt number, as the front end shows it (``In [N]``).

        IPython 9 counts a cell before running it and IPython 8 after, so the shell's
        ``execution_count`` is off by one on one of them; the running cell's own
        ``ExecutionResult`` holds the number on both.
        """
        running = getattr(getattr(self.shell, "displayhook", None), "exec_result", None)
        number = getattr(running, "execution_count", None)
        return number if isinstance(number, int) else self.shell.execution_count

    def _cell_id(self) -> str | None:
        """The Jupyter cell's id, from the execute request (JupyterLab, Notebook 7)."""
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None:
            return None
        try:
            parent = kernel.get_parent()
        except Exception:  # older ipykernel, or no request in flight
            return None
        cell_id = (parent or {}).get("metadata", {}).get("cellId")
        return str(cell_id) if cell_id else None

    def _notebook_context(self) -> Any:
        from .context import NotebookContext

        return NotebookContext(self.shell, self.errors, self._prompt_number())

    def _namespace(self) -> Any:
        """The user's variables, with ``In`` as the cells were typed (IPython's ``In`` holds
        them after transformation, a %%qwen cell as a run_cell_magic call)."""
        from collections import ChainMap

        raw = getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", None)
        if raw is None or self.shell.user_ns.get("In") is raw:
            return self.shell.user_ns
        return ChainMap({"In": raw, "_ih": raw}, self.shell.user_ns)

    def close(self) -> None:
        """Called on %unload_ext: release connections and the configurable slot."""
        if self.shell is not None:
            try:
                self.shell.events.unregister("post_run_cell", self.errors)
            except ValueError:  # not registered
                pass
        if self._session is not None:
            self._session.close()
        if self.shell is not None and self in self.shell.configurables:
            self.shell.configurables.remove(self)


def _display(obj: Any, **kwargs: Any) -> Any:
    from .publish import display

    return display(obj, **kwargs)
