"""Reading a train config: YAML (duplicate keys refused, size bounded), ``--set a.b=value``
overrides, validation into :class:`~msam.config.schema.TrainConfig`, and the comparison of two
resolved configs that resuming a checkpoint and the sweep's rerun guard both rely on.

What a config may expand to is bounded while it is read: a file of at most :data:`MAX_BYTES`,
at most :data:`MAX_NODES` YAML nodes once aliases are expanded and :data:`MAX_DEPTH` levels of
nesting. Aliases share one object in memory, but validation, ``model_dump`` and every message
that shows a value walk the expanded tree: a "billion laughs" of a kilobyte would take gigabytes
and hours there.

Every problem a user causes is a one-line :class:`msam.errors.UserError` (see
``msam.config.messages``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from msam.config.messages import (
    bounded,
    kind_of,
    show,
    user_error_from_validation,
    yaml_error_message,
)
from msam.config.schema import TrainConfig
from msam.errors import UserError

#: A config model: the train config, a sweep spec.
ConfigT = TypeVar("ConfigT", bound=BaseModel)

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "apply_overrides",
    "first_difference",
    "load_config",
    "load_train_config",
    "load_yaml",
    "parse_config",
    "parse_train_config",
]


#: Largest config file read, in bytes; a train config or sweep spec is a few kilobytes.
MAX_BYTES = 1 << 20
#: Most YAML nodes (keys, values, lists, mappings) a config may hold with its aliases expanded;
#: the shipped sweep specs have about 100.
MAX_NODES = 100_000
#: Deepest nesting of lists and mappings; a sweep spec nests 5 levels.
MAX_DEPTH = 50


class ConfigTooLarge(yaml.MarkedYAMLError):
    """A document that expands beyond :data:`MAX_NODES`, nests beyond :data:`MAX_DEPTH`, or
    holds itself through an alias."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate keys, which plain YAML silently resolves to the last one,
    and counts nodes as it composes them, an alias as the size of what it names, so that an alias
    bomb stops at :data:`MAX_NODES` after reading no more than it counted."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0  # nodes so far, aliases expanded
        self._depth = 0
        self._sizes: dict[str, int] = {}  # anchor -> expanded size of the node it names

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._sizes:
                raise ConfigTooLarge(
                    None,
                    None,
                    f"alias *{event.anchor} is used inside the node it names "
                    "(a structure that contains itself)",
                    event.start_mark,
                )
            self._count(self._sizes.get(event.anchor, 0), event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise ConfigTooLarge(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
            )
        start = self._nodes
        self._count(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = self._nodes - start
        return node

    def _count(self, nodes: int, mark: yaml.Mark) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise ConfigTooLarge(
                None,
                None,
                f"expands to more than {MAX_NODES} values (aliases of aliases?); "
                "a config needs far fewer",
                mark,
            )


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, Iterable) and not isinstance(key, str):
            continue  # unhashable keys: let the normal constructor report them
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; any problem is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a YAML file")
    try:
        with path.open("rb") as file:  # at most MAX_BYTES + 1: /dev/zero is a "file" too
            raw = file.read(MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(bounded(f"{path}: cannot read: {exc}")) from None
    if len(raw) > MAX_BYTES:
        raise UserError(
            bounded(f"{path}: larger than {MAX_BYTES >> 20} MiB; a config is a few kilobytes")
        )
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigTooLarge as exc:
        raise UserError(yaml_error_message(path, exc, what="refused")) from None
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_message(path, exc)) from None
    except ValueError as exc:  # an integer of thousands of digits (int's own limit)
        raise UserError(bounded(f"{path}: invalid YAML: {exc}")) from None
    if data is None:
        raise UserError(f"{path}: file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of keys (got a {kind_of(data)})")
    return data


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _parse_value(key: str, text: str) -> Any:
    """YAML scalar rules, plus '1e-3' as a float (YAML 1.1 reads it as a string); text that is
    not YAML stays text. A value that expands beyond the bounds of a config is refused."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigTooLarge as exc:
        raise UserError(bounded(f"--set {key}: refused: {exc.problem}")) from None
    except (yaml.YAMLError, ValueError):
        return text
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(raw: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` overrides to a copy of ``raw``; values are parsed as YAML.

    Unknown paths are created as given so that validation reports them with a did-you-mean.
    """
    out = copy.deepcopy(dict(raw))
    for item in sets:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(part.strip() for part in parts):
            raise UserError(f"--set {show(item)}: expected KEY=VALUE, e.g. optim.lr=0.1")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(bounded(f"--set {show(item)}: {where} is a value, not a section"))
            node = child
        node[parts[-1]] = _parse_value(bounded(key.strip(), 100), text)
    return out


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping stays a value of its own."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def first_difference(
    before: Mapping[str, Any], after: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> tuple[str, Any, Any] | None:
    """The first dotted key (in sorted order) where two resolved configs differ, with both
    values; keys under ``ignore`` (``"final"`` covers ``final.seeds``) do not count."""
    ignored = tuple(ignore)
    old, new = _dotted(before), _dotted(after)
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in ignored):
            continue
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def parse_config(cls: type[ConfigT], raw: Any, *, source: str = "config") -> ConfigT:
    """Validate a raw mapping (from YAML plus overrides) as ``cls`` (a train config, a sweep
    spec); problems become a one-line UserError naming the key."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise user_error_from_validation(exc, cls, source) from None


def load_config(cls: type[ConfigT], path: str | Path, sets: Sequence[str] = ()) -> ConfigT:
    """Read a YAML file, apply ``--set`` overrides and validate it as ``cls``."""
    return parse_config(cls, apply_overrides(load_yaml(path), sets), source=str(path))


def parse_train_config(raw: Any, *, source: str = "config") -> TrainConfig:
    """Validate a raw mapping (from YAML plus overrides); problems become a one-line UserError."""
    return parse_config(TrainConfig, raw, source=source)


def load_train_config(path: str | Path, sets: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate a train config file in one step, as ``msam train`` does."""
    return load_config(TrainConfig, path, sets)
