"""Loading configs: a YAML file into the typed sections, then `section.key=value` overrides.

Unknown keys and wrong types are errors that name the key, so a typo never silently falls back
to a default.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any, Optional

import yaml

from engine.config.sections import Config
from engine.errors import ConfigError


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type = Config) -> Any:
    """Load `path` (YAML) into `cls`, then apply `a.b=value` overrides, then validate."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = load_yaml(f.read(), f"config file {path!r}") or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; pass a file from configs/") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path!r} is not UTF-8 text; pass a YAML file from configs/") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, not {type(raw).__name__}")
        raw = unshared(raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = load_yaml(value, f"override {item!r}") if value != "" else ""
        except ConfigError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = parsed
    cfg = from_dict(cls, raw)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


# A config has hundreds of values; YAML aliases can make a few bytes expand to billions (a
# "billion laughs" file). The expanded size is measured on the node graph, before anything is built.
MAX_YAML_NODES = 100_000


def load_yaml(text: str, what: str) -> Any:
    """Safe YAML (plain data only) whose aliases expand to at most MAX_YAML_NODES nodes."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    if root is None:
        return None
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise ConfigError(f"{what} holds a YAML alias that contains itself; write the values out")
            return sizes[id(node)]
        sizes[id(node)] = -1
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        if n > MAX_YAML_NODES:
            raise ConfigError(f"{what} expands to more than {MAX_YAML_NODES:,} values through YAML aliases; "
                              f"a config needs far fewer: write the values out instead of nesting aliases")
        sizes[id(node)] = n
        return n

    size(root)
    try:
        return yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def unshared(node: Any) -> Any:
    """A copy in which no two keys hold the same dict or list. YAML anchors and merge keys
    (`detector: {<<: *teacher}`) share the nested mappings, so an override of detector.tiny.seed
    would also change teacher.tiny.seed (copy.deepcopy keeps such sharing)."""
    if isinstance(node, dict):
        return {k: unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unshared(v) for v in node]
    return node


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r} "
                          f"(in {where}; known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        if not math.isfinite(value):  # NaN compares false with every bound a check sets
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return value
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, str) and not value.isprintable():
        raise ConfigError(f"config key {key!r} holds a control character (newline, tab, NUL, escape...): "
                          f"{value!r}; names, paths and templates are one line of printable text")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def to_dict(cfg: Any) -> Any:
    """A config as plain data (dataclasses.asdict, less `late` fields at their defaults: see
    engine.config.sections.late): what stage and run fingerprints are made of."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if not (f.metadata.get("late") and getattr(cfg, f.name) == f.default)}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(v) for v in cfg)
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def fingerprint(obj: Any) -> str:
    """A stable hash of a config section, to tell a resumed run from a different one."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
