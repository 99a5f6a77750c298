"""Strict reading of a config file: UTF-8 text, YAML without duplicate keys, and counts and flags of their own
type (docs/reliability.md). pydantic's lax mode would take `steps: true` as 1 and `batch_size: "32"` as 32,
and PyYAML keeps the last of two `train:` sections without a word; both hide a typo, so both are refused
here, before the schemas see the data."""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


class StrictLoadError(Exception):
    """One readable line naming the file and the key or line (raised as ConfigError by load_config)."""


class _NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader refusing a mapping that names a key twice (YAML 1.2 requires unique keys)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise StrictLoadError(f"key '{key}' appears twice (lines {seen[key]} and {line}); the second would "
                                      f"silently replace the first")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """The file's YAML document, or a StrictLoadError naming the file and line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StrictLoadError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the "
                              f"file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_NoDuplicatesLoader)     # noqa: S506  (a SafeLoader subclass)
    except StrictLoadError as exc:
        raise StrictLoadError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StrictLoadError(f"{path}: not valid YAML{where}") from None
    if data is None:
        raise StrictLoadError(f"{path}: the config is empty; write one with `flowsteer init` (an empty file is "
                              f"refused rather than read as the demo defaults)")
    return data


def _unwrap(annotation: Any) -> tuple[Any, ...]:
    """The plain types an annotation allows (Annotated and Optional / unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in _unwrap(a))
    return (annotation,)


def _is_model(t: Any) -> bool:
    return typing.get_origin(t) is None and isinstance(t, type) and issubclass(t, BaseModel)


def _kind(annotation: Any) -> str | None:
    """'int' or 'bool' where the annotation is exactly that scalar (possibly Optional), else None."""
    plain = [t for t in _unwrap(annotation) if t is not type(None)]
    if plain == [bool]:
        return "bool"
    if plain == [int]:
        return "int"
    return None


def _check_value(value: Any, kind: str, key: str) -> None:
    if kind == "bool" and not isinstance(value, bool):
        raise StrictLoadError(f"'{key}': expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
            return                       # 1e6 written as a number: the schema bounds still apply
        if isinstance(value, bool) or not isinstance(value, int):
            raise StrictLoadError(f"'{key}': expected an integer, got {value!r}")


def check_types(model: type[BaseModel], data: Any, prefix: str = "") -> None:
    """Refuse a bool or a string where a count (int) is wanted, and anything but true/false for a flag,
    in `data` checked against `model`'s fields recursively (lists of ints too). Other problems are the
    schema's to report."""
    if not isinstance(data, dict):
        return
    for name, field in model.model_fields.items():
        if name not in data or data[name] is None:
            continue
        key, value = f"{prefix}{name}", data[name]
        plain = [t for t in _unwrap(field.annotation) if t is not type(None)]
        if len(plain) == 1 and _is_model(plain[0]):
            check_types(plain[0], value, key + ".")
            continue
        kind = _kind(field.annotation)
        if kind:
            _check_value(value, kind, key)
            continue
        origin = typing.get_origin(plain[0]) if len(plain) == 1 else None
        if origin in (list, tuple) and isinstance(value, list):
            args = [a for a in typing.get_args(plain[0]) if a is not Ellipsis]
            item_kinds = {_kind(a) for a in args}
            if len(item_kinds) == 1 and None not in item_kinds:
                item_kind = next(iter(item_kinds))
                for i, item in enumerate(value):
                    _check_value(item, item_kind, f"{key}[{i}]")
        elif origin is dict and isinstance(value, dict):
            args = typing.get_args(plain[0])
            sub = list(_unwrap(args[1])) if len(args) == 2 else []
            if len(sub) == 1 and _is_model(sub[0]):
                for k, v in value.items():
                    check_types(sub[0], v, f"{key}.{k}.")
