"""Typed configs: one dataclass per policy, refinement method, robot and command, with one default per field.

The YAML files in `configs/` are what a user reads and overrides; the dataclasses are what the code reads. They
cannot drift apart: `tests/test_config_registry.py` checks every YAML file against its registered dataclass (same
keys, same defaults). A config reaches the code through `from_mapping`, once, at the edge of a command or of a
checkpoint load; an unknown key or a value of the wrong type is one sentence naming the key.

    @register_config("policy", "flow")
    @dataclass
    class FlowConfig(PolicyConfig):
        prediction_type: str = setting("sample", "sample | velocity", choices=("sample", "velocity"))

Standard library only: the robot computer (no hydra, no torch) builds its control and robot configs here too.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# (group, name) -> dataclass. Groups: "policy", "algo", "robot", "command" (name = the command word).
CONFIGS: dict[tuple[str, str], type] = {}


class ConfigError(ValueError):
    """A setting that is unknown, missing or of the wrong type or value; the message names the key."""


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, choices: tuple | None = None,
            default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its one-line doc (shown by `robopolicy COMMAND --help`) and allowed values.
    Lists and dicts are given as `default` and copied per instance."""
    metadata = {"doc": doc, "choices": choices}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def register_config(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the typed config of `name` in `group` (e.g. "policy", "flow")."""

    def add(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered as a config.")
        CONFIGS[(group, name)] = cls
        return cls

    return add


def config_class(group: str, name: str) -> type:
    try:
        return CONFIGS[(group, name)]
    except KeyError:
        known = sorted(n for g, n in CONFIGS if g == group)
        raise ConfigError(f"{group} {name!r} is unknown; choose one of {known}.") from None


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "", *, allow_unknown: bool = False) -> T:
    """Build and validate `cls` from a mapping (a dict or an OmegaConf DictConfig); missing keys take the field's
    default. `where` prefixes key names in errors ("algo" -> "algo.noise_scale")."""
    data = plain(data) if data is not None else {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of settings, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown and not allow_unknown:
        raise ConfigError(f"{_key(where, unknown[0])} is not a setting of {where or cls.__name__}; "
                          f"known settings: {', '.join(sorted(fields))}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _key(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is required ({f.metadata.get('doc') or 'no default'}).")
            continue
        value = _coerce(data[name], hints[name], key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is unknown; choose one of {', '.join(map(str, choices))}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML, JSON and checkpoints)."""
    return plain(dataclasses.asdict(config))


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of every field that has one, as plain data (nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


def describe(cls: type, indent: str = "") -> list[str]:
    """One line per field, `key: default  # doc`, nested configs indented (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "")
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
            lines += describe(nested, indent + "  ")
            continue
        if f.default is not dataclasses.MISSING:
            shown = f.default
        elif f.default_factory is not dataclasses.MISSING:
            shown = f.default_factory()
        else:
            shown = "???"
        lines.append(f"{indent}{f.name}: {_show(shown)}" + (f"  # {doc}" if doc else ""))
    return lines


def yaml_mismatches(cls: type, yaml: Mapping[str, Any], where: str = "", skip: tuple[str, ...] = (),
                    expected: Mapping[str, Any] | None = None) -> list[str]:
    """How a YAML section disagrees with its dataclass: keys without a field, fields without a key, defaults that
    differ (`expected`: the defaults to compare with, by default the class's own). Interpolations (`${...}`) and
    `???` stand for "set elsewhere" and are not compared."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in sorted(set(yaml) - set(fields) - set(skip)):
        problems.append(f"{_key(where, key)} is in the YAML but not a field of {cls.__name__}")
    for key in sorted(set(fields) - set(yaml) - set(skip)):
        problems.append(f"{_key(where, key)} is a field of {cls.__name__} but missing from the YAML")
    expected = defaults(cls) if expected is None else expected
    for key in sorted(set(fields) & set(yaml) - set(skip)):
        value = yaml[key]
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, Mapping):
            inner = expected.get(key)
            problems += yaml_mismatches(nested, value, _key(where, key),
                                        expected=inner if isinstance(inner, Mapping) else None)
            continue
        if isinstance(value, str) and (value.startswith("${") or value == "???"):
            continue
        if key not in expected:
            problems.append(f"{_key(where, key)} has no default in {cls.__name__} but {value!r} in the YAML")
            continue
        try:
            value = _coerce(value, hints[key], _key(where, key))
        except ConfigError as e:
            problems.append(str(e))
            continue
        if plain(value) != expected[key]:
            problems.append(f"{_key(where, key)} defaults to {expected[key]!r} in {cls.__name__} but {value!r} "
                            "in the YAML")
    return problems


# ------------------------------------------------------------------------------------------------ internals


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def plain(value: Any) -> Any:
    """Plain Python data (JSON / YAML-safe) from OmegaConf containers, tuples, dataclasses and numpy values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if type(value).__module__.startswith("omegaconf"):  # a DictConfig/ListConfig: omegaconf is loaded already
        value = sys.modules["omegaconf"].OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch scalars and arrays
        return value.tolist()
    return value


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of a field typed `SomeConfig` or `SomeConfig | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, lists, unions with None, nested dataclasses, Any)."""
    value = plain(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must be set (null is not allowed).")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}={value!r} fits none of its types ({_show_type(tp)}).")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return value
    return value


def _show(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _show_type(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
