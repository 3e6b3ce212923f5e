"""Cell options: parsed by ``magic_arguments``, checked, and frozen into a dataclass.

Every mistake becomes a one-line ``UsageError``; nothing here talks to the network.
"""

from __future__ import annotations

import argparse
import keyword
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .i18n import N_, _

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("markdown", "text", "code", "json")
# The largest token count a request parameter may carry (DashScope reads them as int32).
MAX_TOKENS_PARAMETER = 2**31 - 1
# --map: the most requests in flight a job may ask for.
MAX_CONCURRENCY = 256

_CELL_ARGUMENTS = (
    argument("-m", "--model", help=N_("Model to ask (default: QwenMagic.model), e.g. qwen-max.")),
    argument("-s", "--system", help=N_("System prompt of the chat, kept for its later turns.")),
    argument("-c", "--chat", default=None, metavar="NAME", help=N_("The named chat to continue (default: default).")),
    argument("-n", "--new", action="store_true", help=N_("Start the chat afresh with this cell.")),
    argument(
        "--no-history",
        action="store_true",
        dest="no_history",
        help=N_("A one-off question: not given the chat's history, not recorded in it."),
    ),
    argument(
        "--max-history",
        type=int,
        metavar="N",
        dest="max_history",
        help=N_("Send at most the last N turns of the chat as context."),
    ),
    argument("-t", "--temperature", type=float, help=N_("Sampling temperature, 0 <= T < 2.")),
    argument("--top-p", type=float, dest="top_p", help=N_("Nucleus sampling, 0 < P <= 1.")),
    argument("--max-tokens", type=int, dest="max_tokens", help=N_("Longest answer, in tokens.")),
    argument("--seed", type=int, help=N_("Seed for repeatable sampling.")),
    argument(
        "--stop",
        action="append",
        default=None,
        help=N_("Stop the answer at this string (repeat the option for several)."),
    ),
    argument(
        "--no-stream",
        action="store_false",
        dest="stream",
        help=N_("Wait for the whole answer instead of streaming it."),
    ),
    argument("-o", "--out", metavar="VAR", help=N_("Store the result object in this variable.")),
    argument(
        "-f",
        "--format",
        choices=FORMATS,
        default=None,
        help=N_("markdown (default), text (plain), code (the answer's code goes into a new cell below) "
           "or json (asks for JSON, parses it, shows it as a tree)."),
    ),
    argument("--no-interp", action="store_false", dest="interpolate", help=N_("Send {name} as written.")),
    argument("--thinking", action="store_true", help=N_("Think before answering (models that can).")),
    argument("--thinking-budget", type=int, metavar="N", dest="thinking_budget", help=N_("Most thinking tokens.")),
    argument("--search", action="store_true", help=N_("Let the model search the web; its sources are listed.")),
    argument(
        "--image",
        action="append",
        metavar="PATH_OR_URL",
        dest="images",
        help=N_("An image for a vision model (repeatable): a URL or a local file."),
    ),
    argument("--protocol", choices=("native", "openai"), help=N_("DashScope native, or the OpenAI-compatible mode.")),
    argument("--base-url", dest="base_url", metavar="URL", help=N_("Another endpoint, e.g. a vLLM server's /v1.")),
    argument(
        "--dry-run",
        action="store_true",
        help=N_("Show what would be sent, its tokens and its cost range; send nothing."),
    ),
    argument(
        "--max-cost",
        type=float,
        metavar="YUAN",
        help=N_("Refuse this call if its worst case (with the longest answer) could cost more "
           "(in the region's currency: yuan in Beijing, US dollars in Singapore)."),
    ),
    argument(
        "--cache",
        action="store_true",
        default=None,
        help=N_("Mark the chat's stable prefix (system prompt, earlier turns) for the explicit context "
           "cache: re-read at 10%% of the input price, written once at 125%% (models that have it)."),
    ),
    # ---- the notebook as context
    argument(
        "--fix",
        action="store_true",
        help=N_("Send the last error (its cell, message and traceback) and ask for its cause and a corrected "
           "cell, which goes into a new cell below; the cell's text is added to the question."),
    ),
    argument(
        "--cells",
        metavar="N|A-B",
        help=N_("Send the last N code cells before this one (or cells In [A] to In [B]) with their outputs."),
    ),
    argument(
        "--file",
        action="append",
        metavar="PATH",
        dest="files",
        help=N_("A text file sent before the question (repeatable); a large CSV or JSONL is summarised."),
    ),
    # ---- tools and structured answers
    argument(
        "--tools",
        action="append",
        metavar="NAME[,NAME]",
        help=N_("Notebook functions the model may call (repeatable, or comma-separated)."),
    ),
    argument("--max-rounds", type=int, metavar="N", dest="max_rounds", default=5,
             help=N_("With --tools: most requests in one cell's exchange of calls (default 5).")),
    argument("--confirm", action="store_true", help=N_("With --tools: ask y/n before each call runs.")),
    argument("--schema", metavar="NAME",
             help=N_("Answer as this Pydantic model, TypedDict, dataclass or JSON Schema dict; "
                     ".value is the instance.")),
    argument("--retries", type=int, metavar="N", default=1,
             help=N_("With --schema: ask again this many times when the answer does not validate (default 1).")),
    # ---- jobs over rows (--map)
    argument(
        "--map",
        metavar="NAME",
        dest="map",
        help=N_("Ask once per element of the notebook's collection NAME (list, dict, pandas Series or "
                "DataFrame): {item} is the element, {index} its position or key."),
    ),
    argument("--concurrency", type=int, metavar="N", help=N_("--map: most requests in flight (default: QwenMagic.concurrency).")),
    argument("--fresh", action="store_true", help=N_("--map: ask every row again, not only those without a result.")),
    # ---- DashScope Batch (--map ... --batch)
    argument("--batch", action="store_true",
             help=N_("--map: send the rows as one DashScope Batch job (half price, answers within the window); "
                     "the cell returns at once and -o fills in when the job completes.")),
    argument("--batch-window", dest="batch_window", metavar="WINDOW",
             help=N_("--batch: the completion window, 24h (default) to 336h, or 1d to 14d.")),
)


def parse_cell_line(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    """The ``%%qwen`` line's options; a line that cannot be split is one ``UsageError``."""
    try:
        line.encode()
    except UnicodeEncodeError:  # a lone surrogate: no error message that quoted it could be shown
        raise UsageError(_("The %%qwen line has a broken character (half of a surrogate pair); retype it.")) from None
    try:
        return parse_argstring(magic, line)
    except UsageError as error:  # argparse's own refusal, in English: said in the current language
        raise UsageError(argparse_refusal(str(error))) from None
    except ValueError as error:  # shlex: "No closing quotation", "No escaped character"
        raise UsageError(_("The %%qwen line cannot be read: {error} (quote values with spaces in matching "
                           "quotes).").format(error=error)) from None


# The options of lines read before: a cell run again (or a benchmark's loop) does not parse its
# line again. Options are a value of the line alone; refusals are never kept.
_READ_LINES: dict[str, "CellOptions"] = {}
_READ_LINES_KEPT = 64
_READ_LINE_LONGEST = 4096  # a longer line (a pasted system prompt) is parsed each time, not kept


def cell_options(magic: Callable[..., Any], line: str) -> "CellOptions":
    """The ``%%qwen`` line's options, checked; a ``UsageError`` says what is wrong with it."""
    options = _READ_LINES.get(line)
    if options is None:
        options = CellOptions.from_namespace(parse_cell_line(magic, line))
        if len(line) > _READ_LINE_LONGEST:
            return options
        if len(_READ_LINES) >= _READ_LINES_KEPT:
            _READ_LINES.pop(next(iter(_READ_LINES)))  # the oldest
        _READ_LINES[line] = options
    return options


def cell_arguments(func: F) -> F:
    """All ``%%qwen`` options in one decorator, so the magic's help lists them."""
    for decorator in reversed(_CELL_ARGUMENTS):
        func = decorator(func)
    return magic_arguments()(func)


@dataclass(frozen=True)
class CellOptions:
    """What the ``%%qwen`` line asked for; ``None`` means "use the setting"."""

    model: str | None = None
    system: str | None = None
    chat: str = "default"
    new: bool = False
    no_history: bool = False
    max_history: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stream: bool | None = None  # None: the QwenMagic.stream setting
    out: str | None = None
    dry_run: bool = False
    max_cost: float | None = None
    format: str | None = None
    interpolate: bool = True
    thinking: bool = False
    thinking_budget: int | None = None
    search: bool = False
    images: tuple[str, ...] = ()
    protocol: str | None = None
    base_url: str | None = None
    # The notebook as context
    fix: bool = False
    cells: int | tuple[int, int] | None = None  # the last N cells, or In [A] to In [B]
    files: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    max_rounds: int = 5
    confirm: bool = False
    schema: str | None = None
    retries: int = 1
    # jobs over rows (--map)
    map: str | None = None
    concurrency: int | None = None
    fresh: bool = False
    cache: bool | None = None  # None: the QwenMagic.cache setting
    # DashScope Batch (--map ... --batch)
    batch: bool = False
    batch_window: str | None = None

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "CellOptions":
        options = cls(
            model=_strip_quotes(namespace.model),
            system=_strip_quotes(namespace.system),
            chat="default" if namespace.chat is None else _strip_quotes(namespace.chat) or "",
            new=namespace.new,
            # An error and its fix are a one-off unless a chat is named.
            no_history=namespace.no_history or (namespace.fix and namespace.chat is None and not namespace.new),
            max_history=namespace.max_history,
            temperature=namespace.temperature,
            top_p=namespace.top_p,
            max_tokens=namespace.max_tokens,
            seed=namespace.seed,
            stop=tuple(_strip_quotes(s) or "" for s in (namespace.stop or ())),
            stream=None if namespace.stream else False,
            out=namespace.out,
            dry_run=namespace.dry_run,
            max_cost=namespace.max_cost,
            format=namespace.format,
            interpolate=namespace.interpolate,
            thinking=namespace.thinking or namespace.thinking_budget is not None,
            thinking_budget=namespace.thinking_budget,
            search=namespace.search,
            images=tuple(_strip_quotes(i) or "" for i in (namespace.images or ())),
            protocol=namespace.protocol,
            base_url=_strip_quotes(namespace.base_url),
            fix=namespace.fix,
            cells=None if namespace.cells is None else parse_cells(_strip_quotes(namespace.cells) or ""),
            files=tuple(_strip_quotes(f) or "" for f in (namespace.files or ())),
            tools=tuple(name.strip() for given in (namespace.tools or ()) for name in given.split(",") if name.strip()),
            max_rounds=namespace.max_rounds,
            confirm=namespace.confirm,
            schema=_strip_quotes(namespace.schema),
            retries=namespace.retries,
            map=namespace.map,
            concurrency=namespace.concurrency,
            fresh=namespace.fresh,
            cache=getattr(namespace, "cache", None),
            batch=getattr(namespace, "batch", False),
            batch_window=_strip_quotes(getattr(namespace, "batch_window", None)),
        )
        options.validate()
        options.validate_job()
        return options

    def validate(self) -> None:
        """Refuse values DashScope would reject, before anything is sent."""
        if self.model is not None and not self.model.strip():
            raise UsageError(_("-m/--model needs a model name, e.g. -m qwen-plus."))
        if self.model is not None and has_control_characters(self.model):
            raise UsageError(_("-m/--model: {model} has control characters; no model name does.").format(
                model=repr(self.model)))
        if not self.chat.strip() or len(self.chat) > 100:
            raise UsageError(_("-c/--chat needs a name of 1 to 100 characters."))
        if has_control_characters(self.chat):
            raise UsageError(_("-c/--chat: {chat} has control characters; a chat name has none.").format(
                chat=_shown(self.chat)))
        if self.new and self.no_history:
            raise UsageError(_("-n/--new starts a chat and --no-history stays out of chats: use one of them."))
        if self.max_history is not None and self.max_history < 0:
            raise UsageError(_("--max-history must be 0 or more turns, not {value}.").format(value=self.max_history))
        if self.temperature is not None and not 0 <= self.temperature < 2:
            raise UsageError(_("-t/--temperature must be in [0, 2), not {value}.").format(value=self.temperature))
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(_("--top-p must be in (0, 1], not {value}.").format(value=self.top_p))
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_TOKENS_PARAMETER:
            raise UsageError(_("--max-tokens must be from 1 to {most}, not {value}.").format(
                most=f"{MAX_TOKENS_PARAMETER:,}", value=_shown(self.max_tokens)))
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise UsageError(_("--seed must be in [0, 2**31), not {value}.").format(value=self.seed))
        if any(not s for s in self.stop):
            raise UsageError(_("--stop needs a non-empty string."))
        if self.max_cost is not None and not 0 < self.max_cost < math.inf:  # nan and inf guard nothing
            raise UsageError(_("--max-cost must be a positive, finite amount of yuan, not {value}.").format(
                value=self.max_cost))
        if self.thinking_budget is not None and not 1 <= self.thinking_budget <= MAX_TOKENS_PARAMETER:
            raise UsageError(_("--thinking-budget must be from 1 to {most} tokens, not {value}.").format(
                most=f"{MAX_TOKENS_PARAMETER:,}", value=_shown(self.thinking_budget)))
        if self.max_history is not None and self.max_history > MAX_TOKENS_PARAMETER:
            raise UsageError(_("--max-history must be at most {most} turns, not {value}.").format(
                most=f"{MAX_TOKENS_PARAMETER:,}", value=_shown(self.max_history)))
        if self.base_url is not None:
            problem = url_problem(self.base_url)
            if problem:
                raise UsageError(_("--base-url {url}: {problem}.").format(url=_shown(self.base_url), problem=problem))
        if self.out is not None and (not self.out.isidentifier() or keyword.iskeyword(self.out)):
            raise UsageError(_("-o/--out needs a variable name (not a Python keyword), not {value}.").format(
                value=_shown(self.out)))
        if any(not path.strip() for path in self.files):
            raise UsageError(_("--file needs a path, e.g. --file notes.md."))
        self._validate_tools_and_schema()

    def _validate_tools_and_schema(self) -> None:
        for name in self.tools:
            if not name.isidentifier():
                raise UsageError(_("--tools needs names of the notebook's functions, not {value}.").format(
                    value=_shown(name)))
        if len(set(self.tools)) != len(self.tools):
            raise UsageError(_("--tools names a function twice; name each once."))
        if not 1 <= self.max_rounds <= 50:
            raise UsageError(_("--max-rounds must be from 1 to 50 requests, not {value}.").format(
                value=_shown(self.max_rounds)))
        if self.confirm and not self.tools:
            raise UsageError(_("--confirm asks before each tool call: it needs --tools."))
        if self.schema is not None and not self.schema.isidentifier():
            raise UsageError(_("--schema needs the name of a class or dict in the notebook, not {value}.").format(
                value=_shown(self.schema)))
        if not 0 <= self.retries <= 5:
            raise UsageError(_("--retries must be from 0 to 5, not {value}.").format(value=_shown(self.retries)))
        if self.schema is not None and self.format not in (None, "json"):
            raise UsageError(_("--schema answers in JSON: -f {format} cannot apply; leave -f out.").format(
                format=self.format))
        if self.thinking and (self.schema is not None or self.format == "json"):
            given = "--schema" if self.schema is not None else "-f json"
            raise UsageError(_("--thinking and {given} do not mix: DashScope has no JSON mode while thinking; "
                               "drop one.").format(given=given))

    def validate_job(self) -> None:
        """--map's own options, and the cell options that mean nothing for independent rows."""
        if self.batch_window is not None and not self.batch:
            raise UsageError(_("--batch-window is the completion window of a batch job: add --batch (with --map NAME)."))
        if self.map is None:
            for given, name in ((self.concurrency is not None, "--concurrency"), (self.fresh, "--fresh"),
                                (self.batch, "--batch")):
                if given:
                    raise UsageError(_("{name} is for jobs over rows: add --map NAME.").format(name=name))
            return
        if not self.map.isidentifier() or keyword.iskeyword(self.map):
            raise UsageError(_("--map needs the name of a notebook variable, not {name}.").format(name=_shown(self.map)))
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise UsageError(_("--concurrency must be from 1 to {most} requests, not {given}.").format(
                most=MAX_CONCURRENCY, given=self.concurrency))
        refused = (
            (self.chat != "default", "-c/--chat", N_("each row is a one-off question, in no chat")),
            (self.new, "-n/--new", N_("each row is a one-off question, in no chat")),
            (self.max_history is not None, "--max-history", N_("each row is a one-off question, with no history")),
            (self.format == "code", "-f code", N_("it puts one answer's code in a new cell; use -f text or -f json")),
            (not self.interpolate, "--no-interp", N_("each row's {{item}} must be filled in")),
            (self.fix, "--fix", N_("it asks about one error, not about rows")),
            (self.cells is not None, "--cells", N_("each row is asked on its own, without the notebook's cells")),
            (bool(self.files), "--file", N_("each row is asked on its own, without files")),
            (bool(self.tools), "--tools", N_("each row is one request, with no calls to run in between")),
        )
        for given, name, why in refused:
            if given:
                # Translators: {why} is one of the reasons above, already in the current language.
                raise UsageError(_("{name} cannot be used with --map: {why}.").format(
                    name=name, why=_(why).replace("{{", "{").replace("}}", "}")))
        if self.batch and self.concurrency is not None:
            raise UsageError(_("--concurrency cannot be used with --batch: the service runs a batch's rows at its "
                               "own pace."))

    def parameters(self) -> dict[str, Any]:
        """The request parameters that were given, as the SDK names them."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop) or None,
            "enable_thinking": True if self.thinking else None,
            "thinking_budget": self.thinking_budget,
            "enable_search": True if self.search else None,
            # Without enable_source DashScope searches but does not say where it looked.
            "search_options": {"enable_source": True} if self.search else None,
            "response_format": {"type": "json_object"} if self.format == "json" else None,
        }
        return {name: value for name, value in given.items() if value is not None}


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a NUL, a newline or another control character."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def url_problem(url: str) -> str | None:
    """What is wrong with an endpoint URL (scheme, host, port, brackets), or None if it can be used.

    Checked before any client is built, so that a typo is one line, not a traceback from the
    HTTP library (whose frames would carry the client's configuration).
    """
    from urllib.parse import urlsplit

    if has_control_characters(url) or any(char.isspace() for char in url):
        return _("a URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as error:
        return _("not a valid URL ({error})").format(error=error)
    if parts.scheme.lower() not in ("http", "https"):
        return _("an endpoint needs an http:// or https:// URL")
    if not parts.hostname:
        return _("the URL names no host")
    if port == 0:
        return _("the URL's port must be from 1 to 65535")
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        import ipaddress

        try:
            ipaddress.IPv6Address(parts.hostname.split("%", 1)[0])
        except ValueError:
            return _("[{host}] is not an IPv6 address").format(host=parts.hostname)
    elif "[" in host or "]" in host:
        return _("brackets in a URL may only enclose an IPv6 address")
    try:  # what the HTTP client itself will make of it
        import httpx

        httpx.URL(url)
    except Exception as error:
        return _("not a valid URL ({error})").format(error=error)
    return None


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error line: its repr, shortened so that the line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else _("{start}… ({length} characters)").format(
        start=text[:limit], length=f"{len(text):,}")


def _strip_quotes(value: str | None) -> str | None:
    """arg_split keeps quotes inside tokens like -s="be brief"; drop one matching pair."""
    if value and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_cells(spec: str) -> int | tuple[int, int]:
    """``--cells N`` (the last N code cells) or ``--cells A-B`` (cells In [A] to In [B])."""
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            count = int(first)
            if 1 <= count <= 1000:
                return count
        else:
            start, end = int(first), int(last)
            if 1 <= start <= end:
                return start, end
    except ValueError:
        pass
    raise UsageError(_("--cells takes a number of cells (e.g. --cells 3) or a range of prompt numbers "
                       "(e.g. --cells 3-7), not {value}.").format(value=_shown(spec)))


# ---- argparse's own refusals (an unknown option, a value of the wrong type), translated

_ARGPARSE_REFUSALS = (
    (r"unrecognized arguments: (?P<arguments>.*)", N_("unrecognized arguments: {arguments}")),
    (r"argument (?P<option>\S+): invalid (?P<type>\w+) value: (?P<value>.*)",
     N_("argument {option}: invalid {type} value: {value}")),
    (r"argument (?P<option>\S+): expected one argument", N_("argument {option}: expected one argument")),
    (r"argument (?P<option>\S+): invalid choice: (?P<value>.*) \(choose from (?P<choices>.*)\)",
     N_("argument {option}: invalid choice: {value} (choose from {choices})")),
    (r"ambiguous option: (?P<option>\S+) could match (?P<matches>.*)",
     N_("ambiguous option: {option} could match {matches}")),
)


def argparse_refusal(message: str) -> str:
    """argparse's message in the current language (as it came, if it is not one of those known)."""
    import re

    for pattern, translated in _ARGPARSE_REFUSALS:
        found = re.fullmatch(pattern, message, re.DOTALL)
        if found:
            return _(translated).format(**found.groupdict())
    return message
