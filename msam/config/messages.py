"""One-line messages for the errors a user causes in a config: pydantic's multi-line validation
report and PyYAML's parse errors become a single :class:`msam.errors.UserError` line that names
the key, the value and, for typos, the closest valid name. A line is at most
:data:`MAX_MESSAGE` characters, whatever the config holds (a key of a megabyte, a value that
expands to millions of items).

Works on any pydantic model (the train config here, the sweep spec in ``sweeps.spec``).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from msam.errors import UserError

__all__ = [
    "MAX_MESSAGE",
    "bounded",
    "did_you_mean",
    "kind_of",
    "one_line",
    "show",
    "user_error_from_validation",
    "yaml_error_message",
]


#: Longest error message (characters): a terminal line or two, never a screenful.
MAX_MESSAGE = 500


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed: a message must stay one line."""
    return " ".join(text.split())


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one line of at most ``limit`` characters, cut with "…" where longer."""
    line = one_line(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def kind_of(value: Any) -> str:
    """A value's type in YAML's words (mapping, list, string, int, ...)."""
    return {list: "list", dict: "mapping", str: "string"}.get(type(value), type(value).__name__)


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc_path(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        if not isinstance(part, int):
            part = bounded(str(part), 60)  # an unknown key may be any length
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _annotation_at(model: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """Follow ``loc`` through nested models to the field's annotation (None if it leaves models)."""
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        models = _models_in(annotation)
        if not models or part not in models[0].model_fields:
            return None
        annotation = models[0].model_fields[part].annotation
    return annotation


def _literal_choices(annotation: Any) -> list[Any]:
    return [
        value
        for t in _unwrap(annotation)
        if typing.get_origin(t) is Literal
        for value in typing.get_args(t)
    ]


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    path = _loc_path(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        sections = _models_in(_annotation_at(model, loc[:-1]))
        allowed = list(sections[0].model_fields) if sections else []
        hint = did_you_mean(loc[-1], allowed)
        if not hint and allowed:
            hint = f" (allowed: {', '.join(allowed)})"
        return f"unknown key '{path}'{hint}"
    prefix = f"{path}: " if path else ""
    if kind == "missing":
        return f"{prefix}required key is missing"
    if kind == "literal_error":
        choices = _literal_choices(_annotation_at(model, loc))
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        listed = ", ".join(str(c) for c in choices) or error["msg"]
        return f"{prefix}unknown value {show(value)}{hint}; expected one of {listed}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{prefix}expected a mapping of keys (got {show(value)})"
    if kind in ("value_error", "assertion_error"):
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # Section-level checks name their keys themselves ("optim.micro_batches is 4 ...").
        return message if path and message.startswith(f"{path}.") else prefix + message
    return f"{prefix}{error['msg']} (got {show(value)})"


def user_error_from_validation(
    exc: ValidationError, model: type[BaseModel], source: str
) -> UserError:
    """Turn pydantic's multi-line report into one line: the first problem, plus a count."""
    errors = exc.errors(include_url=False)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    message = bounded(f"{source}: {_describe(errors[0], model)}", MAX_MESSAGE - len(more))
    return UserError(message + more)


def yaml_error_message(path: Path, exc: yaml.YAMLError, *, what: str = "invalid YAML") -> str:
    """``file:line:column: invalid YAML: <problem>``, from PyYAML's marks where it has them."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return bounded(f"{where}: {what}: {problem}")
