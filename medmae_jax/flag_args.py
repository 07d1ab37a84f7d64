"""Command-line conventions of ``ml_collections.config_flags``, matched on top of argparse.

``--config.a.b=value`` and ``--config.a.b value`` are overrides; ``--flagfile FILE`` (or ``=FILE``)
splices in the flags of FILE, one per line, ``#`` and ``//`` lines are comments, nesting allowed.
"""

from __future__ import annotations

import os
import shlex

from medmae_jax.errors import ConfigError

_OVERRIDE = "--config."
_FLAGFILE = "--flagfile"


def _flagfile_lines(path: str, seen: tuple[str, ...]) -> list[str]:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"--flagfile {path}: includes itself")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"--flagfile {path}: cannot be read ({exc.strerror or exc})") from None
    out = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(("#", "//")):
            continue
        flag, _, _ = line.partition(" ")
        if line.startswith("--") and "=" in flag:
            out.append(line)  # absl: one flag per line, the value may hold spaces
            continue
        try:
            out.extend(shlex.split(line))
        except ValueError as exc:
            raise ConfigError(f"--flagfile {path}, line {number}: {exc}") from None
    return expand_flagfiles(out, seen + (real,))


def expand_flagfiles(argv: list[str], seen: tuple[str, ...] = ()) -> list[str]:
    """Replace every ``--flagfile FILE`` / ``--flagfile=FILE`` by the flags written in FILE."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == _FLAGFILE:
            if i + 1 >= len(argv):
                raise ConfigError("--flagfile: expected a file name")
            out.extend(_flagfile_lines(argv[i + 1], seen))
            i += 2
            continue
        if arg.startswith(_FLAGFILE + "="):
            out.extend(_flagfile_lines(arg[len(_FLAGFILE) + 1:], seen))
        else:
            out.append(arg)
        i += 1
    return out


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.key=value`` / ``--config.key value`` overrides (as ``key=value``) from the rest."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith(_OVERRIDE):
            rest.append(arg)
            i += 1
            continue
        key, eq, _ = arg[len(_OVERRIDE):].partition("=")
        if eq:
            overrides.append(arg[len(_OVERRIDE):])
            i += 1
            continue
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError(f"{arg}: expected a value (--config.{key}=VALUE or --config.{key} VALUE)")
        overrides.append(f"{key}={argv[i + 1]}")
        i += 2
    return rest, overrides
