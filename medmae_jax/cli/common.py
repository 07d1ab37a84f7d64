"""Arguments shared by several commands."""

from __future__ import annotations


def add_config_argument(parser, required: bool = True):
    parser.add_argument("--config", required=required,
                        help="a shipped config name (btcv_mae3d) or a config file path, [:args]; "
                             "then --config.key=value (or --config.key value) overrides")


def load(args, overrides):
    from medmae_jax.config_loading import config_from_args
    return config_from_args(args.config, overrides)
