"""Arguments shared by several commands."""

from __future__ import annotations


def add_config_argument(parser, required: bool = True):
    parser.add_argument("--config", required=required,
                        help="configs/<name>.py[:arg]; then any number of --config.key=value overrides")


def load(args, overrides):
    from medmae_jax.config_loading import config_from_args
    return config_from_args(args.config, overrides)
