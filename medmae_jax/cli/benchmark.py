"""medmae-jax benchmark: steps/s, FLOPs, MFU and peak memory of a config's step, optionally beside MONAI."""

from __future__ import annotations

import json
import sys

from medmae_jax.cli.common import add_config_argument

HELP = ("time a config's jitted train step (or sliding-window inference) and print one JSON line per setting; "
        "--against monai times the PyTorch/MONAI peer alternately on the same threads")


def add_arguments(parser):
    add_config_argument(parser, required=False)
    parser.add_argument("--suite", choices=("accelerator", "smoke"), default=None,
                        help="accelerator: 2-D/3-D MAE ViT-B, UNETR step and a 512x512x200 sliding window in the "
                             "configs' auto precision, beside MONAI (torch AMP) when torch sees a GPU; writes "
                             "suite.jsonl and suite.md to --output. smoke: the same plan with :quick configs")
    parser.add_argument("--output", default="benchmark-suite", help="--suite: folder for suite.jsonl and suite.md")
    parser.add_argument("--what", default="train", choices=("train", "sliding_window", "input"),
                        help="train: the config's task step through the trainer (MAE for pre-training configs); "
                             "sliding_window: UNETR sliding-window inference over a whole volume; "
                             "input: training examples/crops per second of the input pipeline, without and "
                             "with the in-memory cache")
    parser.add_argument("--against", choices=("monai",), default=None,
                        help="also time the PyTorch/MONAI peer (needs the [parity] extra) and print the ratio")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[None],
                        help="one or more batch sizes (default: the config's; sliding window: volumes, default 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round (default 5; sliding window 1 volume)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps including the compiling one")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for each framework (default: every CPU this process may use)")
    parser.add_argument("--volume", type=int, nargs=3, default=(192, 192, 128), metavar=("D", "H", "W"),
                        help="sliding window: volume size (default 192 192 128, a CT after resampling)")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="sliding window: windows per model call")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding window: window overlap")
    parser.add_argument("--num-classes", type=int, default=14, help="UNETR output channels (BTCV: 14)")
    parser.add_argument("--feature-size", type=int, default=16, help="UNETR decoder feature size")
    parser.add_argument("--examples", type=int, default=8, help="input: examples timed per setting")
    parser.add_argument("--worker-processes", type=int, default=None,
                        help="input: also time this many loader worker processes beside the threads "
                             "(default: data.worker_processes; 0: threads only)")
    parser.add_argument("--synthetic-volume", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="input: build BTCV-layout phantoms of this size (e.g. 204 153 180) and read those")


def run(args, overrides) -> int:
    from medmae_jax.benchmark import Settings, run_benchmark
    from medmae_jax.errors import ConfigError

    if args.suite:
        from medmae_jax.benchmark import suite
        table = suite.run_suite(args.output, scale=args.suite, against=args.against or "auto",
                                log=lambda s: print(s, file=sys.stderr, flush=True))
        print(table)
        return 0
    if not args.config:
        raise ConfigError("benchmark needs --config (or --suite accelerator)")

    if args.what == "input":
        from medmae_jax.benchmark import input_pipeline
        from medmae_jax.config_loading import apply_override, load_config
        config = load_config(args.config)
        for assignment in overrides:
            apply_override(config, assignment)
        input_pipeline.run(config, examples=args.examples, threads=args.threads,
                           synthetic_volume=args.synthetic_volume, processes=args.worker_processes)
        return 0

    steps = args.steps if args.steps is not None else (1 if args.what == "sliding_window" else 5)
    settings = Settings(config=args.config, overrides=tuple(overrides), what=args.what, against=args.against,
                        batch_sizes=tuple(args.batch_size), steps=steps, warmup=args.warmup, rounds=args.rounds,
                        threads=args.threads, volume=tuple(args.volume), sw_batch_size=args.sw_batch_size,
                        overlap=args.overlap, num_classes=args.num_classes, feature_size=args.feature_size)

    def emit(record):
        print(json.dumps(record), flush=True)

    run_benchmark(settings, emit=emit, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0
