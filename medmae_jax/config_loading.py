"""``--config NAME|file.py[:arg]`` loading and ``--config.a.b=value`` overrides with clear errors.

A name (``btcv_mae3d``, ``btcv_mae3d.py``) is looked up among the shipped configs
(``medmae_jax/configs`` when installed, the checkout's top-level ``configs/`` otherwise);
anything that exists as a file is loaded as a path. A misspelt key fails with the key,
the closest existing names and the file; a value that does not fit the field's type fails with both.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import os
import sys
from pathlib import Path

import ml_collections

from medmae_jax.errors import ConfigError


def shipped_configs_dir() -> Path:
    """The folder of shipped configs: package data when installed, ``configs/`` of a source checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_config_names() -> list[str]:
    folder = shipped_configs_dir()
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_")) if folder.is_dir() else []


def resolve_config_path(path: str) -> str:
    """An existing file as given, else a shipped config of that name (``.py`` optional)."""
    if os.path.isfile(path):
        return path
    name = path[:-3] if path.endswith(".py") else path
    if name and os.sep not in name and "/" not in name:
        candidate = shipped_configs_dir() / f"{name}.py"
        if candidate.is_file():
            return str(candidate)
    names = shipped_config_names()
    close = difflib.get_close_matches(os.path.basename(name), names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs: {', '.join(names)}"
    raise ConfigError(f"config {path!r} is neither a file nor a shipped config name{hint}")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``NAME|path/to/config.py[:arg]`` -> ``get_config(arg)`` of that file."""
    given, _, arg = spec.partition(":")
    path = resolve_config_path(given)
    module_name = f"_medmae_config_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def _coerce(key: str, old, raw: str):
    if isinstance(old, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={raw}: expected a boolean (true/false)")
    if isinstance(old, int):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw}: expected an integer") from None
        if value != int(value):
            raise ConfigError(f"--config.{key}={raw}: expected an integer")
        return int(value)
    if isinstance(old, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw}: expected a number") from None
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{key}={raw}: expected a tuple such as (96,96,96)") from None
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return type(old)(value)
    if old is None:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    return raw


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Apply ``a.b=value`` to ``config`` in place; unknown keys are errors with suggestions."""
    key, eq, raw = assignment.partition("=")
    if not eq:
        raise ConfigError(f"--config.{assignment}: expected --config.key=value")
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=3)
            where = ".".join(parts[:depth]) or "the config"
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"--config.{key}: {where} has no field {part!r}{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    if isinstance(node[last], ml_collections.ConfigDict) and "enabled" in node[last]:
        node, last = node[last], "enabled"  # --config.distributed=true: shorthand for the section's switch
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
        node[last] = _coerce(key, node[last], raw)


def config_from_args(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    config = load_config(spec)
    for assignment in overrides:
        apply_override(config, assignment)
    return config
