"""Arguments shared by several commands."""

from __future__ import annotations


def add_config_argument(parser, required: bool = True):
    parser.add_argument("--config", required=required,
                        help="a shipped config name (btcv_mae3d) or a config file path, [:args]; "
                             "then --config.key=value (or --config.key value) overrides")


def load(args, overrides):
    from medmae_jax.config_loading import config_from_args
    return config_from_args(args.config, overrides)


def load_for_run(args, run_path: str, overrides):
    """``--config`` (if given) or the config saved with the run or checkpoint at ``run_path``, with the
    ``--config.key=value`` overrides applied."""
    from medmae_jax.config_loading import apply_override
    from medmae_jax.config_loading import load_config as load_file
    from medmae_jax.train.checkpoint import config_from_checkpoint
    config = load_file(args.config) if args.config else config_from_checkpoint(run_path)
    for assignment in overrides:
        apply_override(config, assignment)
    return config
