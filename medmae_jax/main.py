"""Command line: ``medmae-jax train|evaluate|predict|reconstruct|demo|benchmark|convert|build ...``.

Configs are ``--config NAME|path/to/file.py[:arg]`` plus any number of ``--config.key=value``
(or ``--config.key value``) overrides, checked against the config's fields, and ``--flagfile FILE``
(one flag per line, as absl's ``config_flags``; see medmae_jax/flag_args.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medmae_jax.cli import COMMANDS
from medmae_jax.console import quiet_library_logs, set_progress
from medmae_jax.errors import MedMAEError
from medmae_jax.flag_args import expand_flagfiles, split_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmae-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (INFO shows progress details)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"medmae_jax.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars (they are also off when stderr is not a terminal)")
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Everything after a bare -- belongs to a wrapped command (launch) and is passed on untouched.
        cut = argv.index("--") if "--" in argv else len(argv)
        rest, overrides = split_overrides(expand_flagfiles(argv[:cut]))
        rest += argv[cut:]
    except MedMAEError as exc:
        print(f"medmae-jax: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(message)s")
    set_progress(not args.no_progress)
    quiet_library_logs()
    if overrides and not hasattr(args, "config"):
        print(f"medmae-jax {args.command}: --config.* overrides need --config", file=sys.stderr)
        return 2
    try:
        return args.run(args, overrides)
    except MedMAEError as exc:
        print(f"medmae-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
