"""``%%qwen?`` in the current language: the magic's help, rebuilt from translated parts.

IPython shows a magic's ``__doc__``, which ``magic_arguments`` builds once, at import, from
the description and the options' help texts, all in English. When the language changes,
the same help is formatted again with each part translated; each language's text is kept,
so switching back costs nothing, and English, built at import, is never rebuilt.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

from .i18n import N_, _

# The examples are code (options, prompts, variables), the same in every language; their
# notes in parentheses are translated. Each: the magic's line, the cell's text, a note.
_EXAMPLES: tuple[tuple[str, str | None, str | None], ...] = (
    ("%%qwen", "用一句话解释什么是 Transformer。", None),
    ("%%qwen -m qwen-max -t 0.2 --max-tokens 300 -o answer", "Summarise {report.title} in three bullet points.", None),
    ('%%qwen -c review -s "You are a strict code reviewer."', "Review this function: {source}", None),
    ("%%qwen -f json -o facts", "List three facts about Hangzhou as JSON with keys fact and source.", None),
    ("%%qwen -f code", "Write a pandas one-liner that counts rows per city in df.", None),
    ("%%qwen --thinking -m qwen-plus", 'How many r\'s are in "strawberry"?', None),
    ("%%qwen -m qwen-vl-plus --image chart.png", "What does this chart show?", None),
    ("%%qwen --dry-run --max-cost 0.05", None, N_("(shows the messages, tokens and cost range; sends nothing)")),
    ("%%qwen --tools get_current_weather -o r", "杭州和上海现在的天气如何？", None),
    ("%%qwen --schema Invoice -o inv", "Extract the invoice: {text}", None),
    ("%%qwen --map reviews -o labels -m qwen-flash", "Classify this review as positive, negative or neutral: {item}",
     N_("(one request per element of reviews, concurrently; labels[i] is row i's)")),
    ("%%qwen -m qwen-plus --cache", None, N_("(a long chat re-reads its marked history at 10% of the input price)")),
)
_CONTEXT_EXAMPLES: tuple[tuple[str, str | None, str | None], ...] = (
    ("%qwen fix", None, None),
    ("%%qwen --cells 2 --file notes.md", "Why is the total in the last cell lower than in the notes?", None),
)
# Translators: the help's paragraphs; keep the line breaks short (about 80 columns, 40 Chinese
# characters), the trailing "::" (it opens the examples below) and the ``code`` as it is.
_SUMMARY = N_("Ask a Qwen model; the answer streams into the cell's output.")
_CELL_MAGIC = N_(
    "As a cell magic, the cell's text is the question; {name} is filled in from the\n"
    "notebook's variables (attributes and indexes too; {{ }} and unknown names stay)::"
)
_CHATS = N_(
    "Every cell continues the notebook's chat (-c NAME for another, -n to start it\n"
    "afresh, --no-history for a one-off); re-running a cell replaces its turn. Under\n"
    "the answer, a footer gives the model, the tokens (the server's figures), the cost\n"
    "in yuan, the chat and turn, the session's total and the time. ``-o VAR`` keeps a\n"
    "result object (.text, .value for JSON, .code, .usage, .cost, .request_id;\n"
    ".tool_calls with --tools, .value an instance of the class with --schema)."
)
_LINE_MAGIC = N_(
    "As a line magic: %qwen help | models | usage | budget | count | chats | history |\n"
    "reset | undo | export | resume | repair | config | login | fix | jobs | limit.\n"
    "Costs, budgets and limits are in the region's currency (yuan in Beijing, US dollars in\n"
    "Singapore)."
)
_CONTEXT = N_(
    "The notebook as context: ``%qwen fix`` (or ``%%qwen --fix``) sends the last error with\n"
    "its cell and traceback and puts the corrected cell below; ``--cells 3`` sends the\n"
    "last three code cells with their outputs; ``--file data.csv`` a file. ``{df}`` sends\n"
    "a compact summary of a DataFrame (``{df!full}``: all of it); ``{Out[3]}`` an output's text::"
)
_SETTINGS = N_(
    "Settings: %config QwenMagic (model, system, display, budget, stream, ...).\n"
    "The key comes from %qwen login, DASHSCOPE_API_KEY, or ~/.dashscope/config.toml."
)
# argparse's heading of the options (its own word, from its own catalog, is English).
_OPTIONS = N_("options")


def _examples(examples: tuple[tuple[str, str | None, str | None], ...], translate: Callable[[str], str]) -> str:
    blocks = []
    for command, text, note in examples:
        lines = (command, text, translate(note) if note else None)
        blocks.append("\n".join("    " + line for line in lines if line))
    return "\n\n".join(blocks)


def description(translate: Callable[[str], str] = lambda text: text) -> str:
    """The help's text above the options: English, or translated by ``translate``."""
    return "\n\n".join((
        translate(_SUMMARY), translate(_CELL_MAGIC), _examples(_EXAMPLES, translate), translate(_CHATS),
        translate(_LINE_MAGIC), translate(_CONTEXT), _examples(_CONTEXT_EXAMPLES, translate), translate(_SETTINGS),
    ))


def translated_help(parser: argparse.ArgumentParser) -> str:
    """What ``parser.format_help()`` gives, with the description, headings and help texts translated.

    The steps of ``ArgumentParser.format_help``, on copies of the options: the parser that reads
    every ``%%qwen`` line is left as it is.
    """
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    formatter.add_text(description(_))
    for group in parser._action_groups:
        formatter.start_section(_(_OPTIONS) if group is parser._optionals else group.title)
        formatter.add_text(group.description)
        formatter.add_arguments([_translated(action) for action in group._group_actions])
        formatter.end_section()
    formatter.add_text(parser.epilog)
    return formatter.format_help()


def _translated(action: argparse.Action) -> argparse.Action:
    if not action.help or action.help == argparse.SUPPRESS:
        return action
    shown = copy.copy(action)
    shown.help = _(action.help)  # an option whose help is not in the catalog stays as written
    return shown


def document(magic: Any, language: str) -> None:
    """Make ``magic``'s ``__doc__`` (what ``%%qwen?`` shows) its help in ``language``."""
    function = getattr(magic, "__func__", magic)
    docs: dict[str, str] = function.__dict__.setdefault("docs_by_language", {"en": function.__doc__})
    if language not in docs:
        docs[language] = translated_help(function.parser)
    function.__doc__ = docs[language]


def describe_settings(configurable: type, language: str) -> None:
    """The settings' descriptions (what ``%config QwenMagic`` lists) in ``language``.

    Each trait's English help is kept the first time, and its help replaced by the
    translation; IPython reads ``trait.help`` when it lists the settings.
    """
    if _settings_language.get(configurable) == language:  # every cell asks; most find it done
        return
    for trait in configurable.class_traits(config=True).values():
        english = trait.metadata.setdefault("english_help", trait.help)
        trait.help = english if language == "en" else _(english)
    _settings_language[configurable] = language


_settings_language: dict[type, str] = {}
