"""Load "configs/FILE.py[:variant]" config files and apply "--config.a.b=value" overrides."""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """`path` relative to the working directory, else to the repository root."""
    path = Path(path)
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"config: no file {str(path)!r} in {os.getcwd()} or {REPO_ROOT}")


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Run `get_config(variant)` (or `get_config()` without ":variant") from the file in
    `spec`, then apply `overrides`."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"config: expected 'configs/FILE.py[:variant]', got {spec!r}")
    path, variant = spec, None
    if ":" in spec:
        head, _, tail = spec.rpartition(":")
        if head.endswith(".py"):
            path, variant = head, tail
    if not path.endswith(".py"):
        raise ValueError(f"config: expected 'configs/FILE.py[:variant]', got {spec!r}")
    file = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"dalle2_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config: {file} defines no get_config()")
    config = module.get_config() if variant is None else module.get_config(variant)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config: get_config in {file} returned {type(config).__name__}, "
                         "expected an ml_collections.ConfigDict")
    return apply_overrides(config, overrides)


def _parse_like(key: str, text: str, current: Any) -> Any:
    def fail(expected):
        return ValueError(f"--config.{key}: expected {expected}, got {text!r}")

    if isinstance(current, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise fail("a bool (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise fail("an int") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise fail("a float") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(part.strip() for part in text.strip("()[]").split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if current:  # convert elements to the type of the existing ones
            value = [_parse_like(key, str(v), current[0]) if isinstance(v, str) or
                     type(v) is not type(current[0]) else v for v in value]
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise fail(f"a value for a field of type {type(current).__name__}, which overrides cannot set")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply "--config.a.b=value" (or "config.a.b=value") strings in place; returns `config`.

    The value is parsed to the type of the existing field; unknown keys raise ValueError.
    """
    for override in overrides:
        text = override[2:] if override.startswith("--") else override
        if not text.startswith("config.") or "=" not in text:
            raise ValueError(f"overrides: expected '--config.KEY=VALUE', got {override!r}")
        key, _, value_text = text[len("config."):].partition("=")
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ValueError(f"--config.{key}: unknown key {'.'.join(parents[:depth + 1])!r}")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"--config.{key}: unknown key {key!r}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key}: is a group of settings; override its fields instead")
        node[leaf] = _parse_like(key, value_text, node[leaf])
    return config
