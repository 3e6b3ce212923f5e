"""``--tools``: the notebook's functions as tools the model may call, and running its calls.

A function becomes a tool definition (name, the docstring's first paragraph, a JSON Schema of
its parameters from the signature and type hints); a call the model makes is checked against
the functions named, its arguments parsed and bound, the function run in the kernel, and its
result sent back as text. Nothing the model asks for runs unless the cell named it.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from IPython.core.error import UsageError

from .i18n import _, ngettext

# The lines a call's errors are written in are the cell's language: the cell shows them, they
# stay under the answer with the call, and the model is told the same words (Qwen reads both
# languages), so that what the user reads is what the model read.
#
# What the model is told back, and what the cell shows, is cut here: a tool that returns a
# DataFrame's whole text should not cost a fortune in the next request.
RESULT_LIMIT = 20_000
PREVIEW_LIMIT = 80
RESERVED_NAMES = frozenset({"search"})  # DashScope refuses a tool of this name


class ToolSchemaError(Exception):
    """A type hint that cannot be written as JSON Schema; the message says which."""


# ---- describing a function

# "name: text", "name (type): text" (Google style), or with a full-width colon.
_PARAMETER_LINE = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*[:：]\s*(.+)")


def _docstring_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph, and each parameter's description.

    Reads ``name: text`` lines (with or without a type in brackets, as Google style writes
    ``name (int): text``), and NumPy style's ``name : type`` line followed by an indented
    description.
    """
    if not doc:
        return "", {}
    text = inspect.cleandoc(doc)
    paragraphs = re.split(r"\n\s*\n", text, maxsplit=1)
    first = " ".join(paragraphs[0].split())
    lines = text.splitlines()
    described: dict[str, str] = {}
    numpy_name: str | None = None
    numpy_indent = 0
    for index, line in enumerate(lines):
        stripped = line.strip()
        numpy = re.fullmatch(r"(\w+)\s+:\s*[^:]*", stripped)
        google = _PARAMETER_LINE.fullmatch(stripped)
        if numpy and index + 1 < len(lines) and _indent(lines[index + 1]) > _indent(line):
            numpy_name, numpy_indent = numpy.group(1), _indent(line)
            continue
        if numpy_name and stripped and _indent(line) > numpy_indent:
            described[numpy_name] = " ".join(filter(None, [described.get(numpy_name), stripped]))
            continue
        numpy_name = None
        if google:
            described.setdefault(google.group(1), google.group(2).strip())
    opening = _PARAMETER_LINE.fullmatch(paragraphs[0].splitlines()[0].strip())
    if opening and opening.group(1) in described:
        first = ""  # the docstring starts with the parameters: no description of its own
    return first, described


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def json_schema_of(hint: Any) -> dict[str, Any]:
    """JSON Schema for a type hint; ``ToolSchemaError`` for one that has none."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint is type(None):
        return {"type": "null"}
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin is typing.Annotated:
        return json_schema_of(arguments[0])
    if origin in (typing.Union, types.UnionType):
        options = [argument for argument in arguments if argument is not type(None)]
        schema = json_schema_of(options[0]) if len(options) == 1 else {"anyOf": [json_schema_of(o) for o in options]}
        if len(options) < len(arguments):
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    if origin is typing.Literal:
        kinds = {type(value) for value in arguments}
        schema: dict[str, Any] = {"enum": list(arguments)}
        if len(kinds) == 1 and kinds.pop() in _SIMPLE:
            schema["type"] = _SIMPLE[type(arguments[0])]
        return schema
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        items = arguments[0] if arguments and arguments[-1] is not Ellipsis or len(arguments) == 2 else None
        schema = {"type": "array"}
        if items is not None:
            schema["items"] = json_schema_of(items)
        return schema
    if origin is dict or hint is dict:
        schema = {"type": "object"}
        if len(arguments) == 2:
            schema["additionalProperties"] = json_schema_of(arguments[1])
        return schema
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return {"enum": [member.value for member in hint]}
        if hint in _SIMPLE:
            return {"type": _SIMPLE[hint]}
        if _is_pydantic_model(hint):
            return _inline_refs(hint.model_json_schema())
        if _is_typed_dict(hint):
            return _object_schema(typing.get_type_hints(hint), required=hint.__required_keys__)
        if dataclasses.is_dataclass(hint):
            found = typing.get_type_hints(hint)
            return _object_schema(
                {f.name: found[f.name] for f in dataclasses.fields(hint)},
                required={f.name for f in dataclasses.fields(hint)
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING},
            )
    raise ToolSchemaError(_("its type {type} has no JSON form").format(type=_hint_name(hint)))


_SIMPLE: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or repr(hint)


def _is_pydantic_model(hint: Any) -> bool:
    return isinstance(hint, type) and hasattr(hint, "model_json_schema") and hasattr(hint, "model_validate")


def _is_typed_dict(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__required_keys__")


def _object_schema(hints: Mapping[str, Any], required: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: json_schema_of(hint) for name, hint in hints.items()},
        "required": [name for name in hints if name in required],
    }


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's ``$defs`` put in place: some servers do not follow ``$ref``."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any, depth: int = 0) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/") and depth < 20:
                return resolve(definitions.get(reference.rsplit("/", 1)[-1], {}), depth + 1)
            return {key: resolve(value, depth) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item, depth) for item in node]
        return node

    return resolve(schema)


@dataclass(frozen=True)
class Tool:
    """A notebook function the model may call."""

    name: str
    function: Callable[..., Any]
    description: str
    parameters: dict[str, Any]
    hints: Mapping[str, Any]

    def definition(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def describe(name: str, function: Any) -> Tool:
    """The tool definition of ``function``; a ``UsageError`` says why one cannot be made."""
    if not callable(function) or isinstance(function, type):
        raise UsageError(_("--tools {name}: {quoted} is not a function (it is {type}).").format(
            name=name, quoted=repr(name), type=type(function).__name__))
    if name in RESERVED_NAMES or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name):
        raise UsageError(_("--tools {name}: DashScope does not accept a tool of this name; define it under another.")
                         .format(name=name))
    try:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function, include_extras=True)
    except (TypeError, ValueError, NameError) as error:
        raise UsageError(_("--tools {name}: its signature cannot be read ({error}).").format(name=name, error=error)) from None
    description, described = _docstring_parts(inspect.getdoc(function))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise UsageError(_("--tools {name}: *{parameter} cannot be described to the model; "
                               "give the function named parameters.").format(name=name, parameter=parameter.name))
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise UsageError(_("--tools {name}: {parameter} is positional-only; the model passes arguments by name.")
                             .format(name=name, parameter=parameter.name))
        try:
            schema = dict(json_schema_of(hints.get(parameter.name, parameter.annotation)))
        except ToolSchemaError as error:
            raise UsageError(_("--tools {name}: parameter {parameter} cannot be described: {error}.").format(
                name=name, parameter=repr(parameter.name), error=error)) from None
        if parameter.name in described:
            schema["description"] = described[parameter.name]
        if parameter.default is parameter.empty:
            required.append(parameter.name)
        elif _jsonable(parameter.default):
            schema["default"] = parameter.default
        properties[parameter.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name, function, description or name.replace("_", " "), parameters,
                {key: value for key, value in hints.items() if key != "return"})


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def tools_from(names: tuple[str, ...], namespace: Mapping[str, Any]) -> dict[str, Tool]:
    """The tools a cell named, from the notebook's namespace."""
    found: dict[str, Tool] = {}
    for name in names:
        if name not in namespace:
            raise UsageError(_("--tools {name}: no function of that name is defined in the notebook.").format(name=name))
        found[name] = describe(name, namespace[name])
    return found


def tools_tokens(tools: Mapping[str, Tool]) -> int:
    """Input tokens of the tools' definitions, at least: the server writes them into the prompt."""
    from .tokens import count_text

    if not tools:
        return 0
    return count_text(json.dumps([tool.definition() for tool in tools.values()], ensure_ascii=False))


def calls_tokens(messages: Any) -> int:
    """Input tokens of the calls the assistant's messages carry (their content is counted apart)."""
    from .tokens import count_text

    calls = [message["tool_calls"] for message in messages if message.get("tool_calls")]
    return count_text(json.dumps(calls, ensure_ascii=False)) if calls else 0


# ---- running calls

@dataclass
class ToolCall:
    """One call the model made: what it asked, what came back, and how long it took."""

    id: str
    name: str
    arguments: Any  # the parsed arguments (a dict), or the text as it came when it did not parse
    result: str | None = None
    error: str | None = None
    time: float = 0.0

    def shown(self) -> str:
        """``→ name(a='x', b=2)``, as the cell shows the call."""
        if isinstance(self.arguments, dict):
            listed = ", ".join(f"{key}={value!r}" for key, value in self.arguments.items())
        else:
            listed = _shortened(str(self.arguments), PREVIEW_LIMIT)
        return f"→ {self.name}({listed})"

    def outcome(self) -> str:
        """A short preview of what the call returned (or why it did not run)."""
        if self.error is not None:
            return f"  ✖ {_shortened(self.error, PREVIEW_LIMIT)}"
        return f"  ← {_shortened(self.result or '', PREVIEW_LIMIT)}"

    def message(self) -> dict[str, Any]:
        """The ``tool`` message that answers the call."""
        content = self.result if self.error is None else f"Error: {self.error}"
        return {"role": "tool", "content": content or "", "tool_call_id": self.id}


def _shortened(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def result_text(value: Any) -> str:
    """What a call returned, as the model reads it: text as it is, else JSON, else its repr."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=_plain)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= RESULT_LIMIT else text[:RESULT_LIMIT] + f"… ({len(text):,} characters, cut)"


def _plain(value: Any) -> Any:
    """Pydantic models and dataclasses as their fields; anything else is not JSON."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(type(value).__name__)


def prepare_call(call_id: str, name: str, arguments: str, tools: Mapping[str, Tool]) -> tuple[ToolCall, Callable[[], Any] | None]:
    """The call as recorded, and what runs it; no runner when it must not run (the error says why)."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as error:
        call = ToolCall(call_id, name, arguments)
        call.error = _("the arguments are not valid JSON ({problem} at column {column}); send a JSON object").format(
            problem=error.msg, column=error.colno)
        return call, None
    call = ToolCall(call_id, name, parsed)
    tool = tools.get(name)
    if tool is None:
        call.error = (_("there is no tool named {name}; the tools are: {tools}").format(name=repr(name), tools=", ".join(tools))
                      if tools else _("there is no tool named {name}, and the cell named no tools").format(name=repr(name)))
        return call, None
    if not isinstance(parsed, dict):
        call.error = _("the arguments must be a JSON object of named parameters")
        return call, None
    from .schema import first_problem

    signature = inspect.signature(tool.function)
    unexpected = [key for key in parsed if key not in signature.parameters]
    problem = first_problem(parsed, tool.parameters)
    if unexpected or problem:
        wrong = ngettext("unexpected argument {names}", "unexpected arguments {names}", len(unexpected)).format(
            names=", ".join(map(repr, unexpected))) if unexpected else problem
        call.error = _("the arguments do not fit {function}: {problem}").format(function=f"{name}{signature}", problem=wrong)
        return call, None
    try:
        bound = signature.bind(**{key: _converted(value, tool.hints.get(key))
                                                          for key, value in parsed.items()})
    except TypeError as error:
        call.error = _("the arguments do not fit {function}: {problem}").format(
            function=f"{name}{inspect.signature(tool.function)}", problem=error)
        return call, None
    return call, lambda: tool.function(*bound.args, **bound.kwargs)


def _converted(value: Any, hint: Any) -> Any:
    """A JSON argument made the type the function asked for (a model, a TypedDict, an Enum)."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        return value if value is None or len(options) != 1 else _converted(value, options[0])
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            try:
                return hint(value)
            except ValueError:
                raise TypeError(_("{value} is not one of {allowed}").format(
                    value=repr(value), allowed=[m.value for m in hint])) from None
        if _is_pydantic_model(hint) and isinstance(value, dict):
            try:
                return hint.model_validate(value)
            except Exception as error:  # pydantic's ValidationError: the model can correct it
                raise TypeError(" ".join(str(error).split())[:300]) from None
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return hint(**value)
    return value


def run_call(call: ToolCall, runner: Callable[[], Any]) -> None:
    """Run the call in the kernel; an exception is the call's error (its type and message).

    A KeyboardInterrupt (■) is not caught: it stops the exchange.
    """
    started = time.monotonic()
    try:
        call.result = result_text(runner())
    except Exception as error:
        call.error = f"{type(error).__name__}: {error}"
    finally:
        call.time = time.monotonic() - started


def ask_confirmation(call: ToolCall, ask: Callable[[str], str]) -> bool:
    """y/n through the front end's input; anything but yes declines."""
    answer = ask(_("{call} — run it? [y/N] ").format(call=call.shown()))
    return answer.strip().lower() in ("y", "yes", "是", "好")
