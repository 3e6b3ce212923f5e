"""``--schema``: answers in a shape the notebook defines, checked before they are kept.

The shape is a Pydantic model class, a ``TypedDict``, a dataclass or a JSON Schema dict. Where
the catalog says the model supports it, the request asks for ``json_schema`` (strict);
elsewhere for ``json_object``, with the schema in the system prompt. Either way the answer is
parsed and validated here, and ``.value`` is an instance of the class (or the checked dict).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from IPython.core.error import UsageError

from .i18n import _
from .tools import ToolSchemaError, _is_pydantic_model, _is_typed_dict, json_schema_of

# Instructions to the model, not to the user: in English whatever the cell's language (the
# problem a retry names is the one the cell shows, in the cell's language).
SCHEMA_PROMPT = "Answer with one JSON object only, matching this JSON Schema:\n{schema}"
RETRY_PROMPT = (
    "That answer does not match the schema: {error}. "
    "Answer again with one JSON object only that matches the schema."
)


@dataclass(frozen=True)
class AnswerSchema:
    """The shape a cell's answer must have."""

    name: str
    schema: dict[str, Any]
    target: Any = None  # the class to build (None: a JSON Schema dict, kept as a dict)

    def response_format(self, strict: bool) -> dict[str, Any]:
        if strict:
            return {"type": "json_schema",
                    "json_schema": {"name": _schema_name(self.name), "schema": self.schema, "strict": True}}
        return {"type": "json_object"}

    def system_line(self) -> str:
        return SCHEMA_PROMPT.format(schema=json.dumps(self.schema, ensure_ascii=False))

    def validate(self, data: Any) -> tuple[Any, str | None]:
        """The value (an instance, or the dict), or None and the first failing field with why."""
        target = self.target
        if target is not None and _is_pydantic_model(target):
            return _pydantic(lambda: target.model_validate(data))
        if target is not None:
            adapter = _type_adapter(target)
            if adapter is not None:
                return _pydantic(lambda: adapter.validate_python(data))
        problem = first_problem(data, self.schema)
        if problem:
            return None, problem
        if target is not None and dataclasses.is_dataclass(target):
            try:
                return target(**data), None
            except TypeError as error:
                return None, str(error)
        return data, None


def _schema_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "answer"


def _type_adapter(target: Any) -> Any:
    try:
        from pydantic import TypeAdapter
    except ImportError:  # pydantic is optional: the schema is checked here instead
        return None
    try:
        return TypeAdapter(target)
    except Exception:  # e.g. typing.TypedDict before Python 3.12, which pydantic refuses
        return None


def _pydantic(build: Any) -> tuple[Any, str | None]:
    try:
        return build(), None
    except Exception as error:  # pydantic's ValidationError
        errors = getattr(error, "errors", None)
        if errors is None:
            raise
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        # Pydantic's own message stays as it came, as a server's does.
        if where:
            return None, _("field {field}: {problem}").format(field=where, problem=first.get("msg"))
        return None, _("the answer: {problem}").format(problem=first.get("msg"))


def schema_from(name: str, namespace: Mapping[str, Any]) -> AnswerSchema:
    """The schema a cell named; a ``UsageError`` says why it cannot be one."""
    if name not in namespace:
        raise UsageError(_("--schema {name}: nothing of that name is defined in the notebook.").format(name=name))
    found = namespace[name]
    if isinstance(found, Mapping):
        if not isinstance(found.get("type"), str) and "properties" not in found:
            raise UsageError(_("--schema {name}: this dict is not a JSON Schema (it has no 'type' or 'properties').")
                             .format(name=name))
        try:
            schema = json.loads(json.dumps(found))
        except (TypeError, ValueError):
            raise UsageError(_("--schema {name}: this dict is not a JSON Schema (it is not plain JSON).")
                             .format(name=name)) from None
        return AnswerSchema(name, schema)
    if isinstance(found, type) and (_is_pydantic_model(found) or _is_typed_dict(found) or dataclasses.is_dataclass(found)):
        try:
            return AnswerSchema(name, json_schema_of(found), found)
        except (ToolSchemaError, NameError, TypeError) as error:
            raise UsageError(_("--schema {name}: it cannot be written as JSON Schema ({error}).")
                             .format(name=name, error=error)) from None
    raise UsageError(_(
        "--schema {name}: a Pydantic model class, a TypedDict, a dataclass or a JSON Schema dict is needed, "
        "not {type}."
    ).format(name=name, type=type(found).__name__))


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


def first_problem(value: Any, schema: Mapping[str, Any], where: str = "") -> str | None:
    """The first place ``value`` breaks ``schema`` (the common keywords), as ``field x: why``."""
    if "anyOf" in schema:
        if all(first_problem(value, option, where) for option in schema["anyOf"]):
            return _problem(where, _("field {field}: matches none of the allowed forms"),
                            _("the answer: matches none of the allowed forms"))
        return None
    if "enum" in schema and value not in schema["enum"]:
        return _problem(where, _("field {field}: {value} is not one of {allowed}"),
                        _("the answer: {value} is not one of {allowed}"), value=repr(value), allowed=schema["enum"])
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        allowed = tuple(t for kind in kinds for t in _TYPES.get(kind, (object,)))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            # Translators: between JSON type names (string or null).
            expected = _(" or ").join(kinds)
            return _problem(where, _("field {field}: expected {expected}, got {got}"),
                            _("the answer: expected {expected}, got {got}"), expected=expected, got=type(value).__name__)
    if isinstance(value, dict):
        for required in schema.get("required", ()):
            if required not in value:
                return _("field {field}: missing").format(field=_join(where, required))
        properties = schema.get("properties", {})
        for key, child in value.items():
            if key in properties:
                problem = first_problem(child, properties[key], _join(where, key))
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return _("field {field}: not allowed").format(field=_join(where, key))
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            problem = first_problem(item, schema["items"], _join(where, str(index)))
            if problem:
                return problem
    return None


def _problem(where: str, at_field: str, at_answer: str, **fields: Any) -> str:
    """A problem at a field, or with the answer as a whole (each a sentence of its own)."""
    return at_field.format(field=where, **fields) if where else at_answer.format(**fields)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
