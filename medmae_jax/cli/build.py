"""medmae-jax build: prepare a data set from its manual download into a TFDS data_dir (array_record, no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

from medmae_jax.console import human_bytes, print_wrote, progress_enabled, tree_bytes

HELP = "build chestxray14 | btcv | msd_brain_tumour from the manual download into --data-dir"

DATASETS = ("chestxray14", "btcv", "msd_brain_tumour")


def add_arguments(parser):
    parser.add_argument("dataset", choices=DATASETS, help="which data set")
    parser.add_argument("--manual-dir", required=True, help="the unpacked manual download")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write (configs' data.data_dir)")
    parser.add_argument("--config", default=None,
                        help="builder config: btcv monai|selfmedmae (default monai; configs/btcv_*.py read "
                             "selfmedmae); msd_brain_tumour fold0..fold4 or fold<k>_monai (default fold0)")
    parser.add_argument("--image-size", type=int, default=None, help="chestxray14: stored image size (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="btcv/msd: rebuild even if already built")


def run(args, overrides) -> int:
    import tensorflow_datasets as tfds

    from medmae_jax.errors import ConfigError
    # TFDS draws the per-split example counters; the same rule as every other command decides whether they show.
    tfds.display_progress_bar(progress_enabled())
    started = time.time()
    if args.dataset == "chestxray14":
        if args.config:
            raise ConfigError("chestxray14 has no --config; use --image-size")
        from medmae_jax.data.datasets.chestxray14 import build_chestxray14
        kw = {} if args.image_size is None else {"image_size": args.image_size}
        builder = build_chestxray14(args.manual_dir, args.data_dir, **kw)
    else:
        if args.image_size is not None:
            raise ConfigError(f"--image-size applies to chestxray14, not {args.dataset}")
        if args.dataset == "btcv":
            from medmae_jax.data.datasets.btcv import Btcv as cls
            from medmae_jax.data.datasets.btcv import build_btcv as build
        else:
            from medmae_jax.data.datasets.msd_brain_tumour import MsdBrainTumour as cls
            from medmae_jax.data.datasets.msd_brain_tumour import build_msd_brain_tumour as build
        name = args.config or cls.DEFAULT_CONFIG_NAME
        known = [c.name for c in cls.BUILDER_CONFIGS]
        if name not in known:
            raise ConfigError(f"{args.dataset}: unknown --config {name!r}; known: {', '.join(known)}")
        builder = build(args.manual_dir, args.data_dir, name, overwrite=args.overwrite)
    splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
    print(json.dumps({"dataset": f"{builder.name}/{builder.builder_config.name}", "data_dir": args.data_dir,
                      "splits": splits}))
    print_wrote([built_output(builder, splits, started)])
    return 0


def built_output(builder, splits: dict, started: float) -> str:
    """The final line's part: the data set folder with its examples per split and size, or that it was reused."""
    folder = os.path.abspath(os.fspath(builder.data_dir))
    counts = ", ".join(f"{name} {n}" for name, n in splits.items())
    info = os.path.join(folder, "dataset_info.json")
    name = f"{builder.name}/{builder.builder_config.name} {builder.version}"
    if os.path.isfile(info) and os.path.getmtime(info) < started:
        return f"nothing new: {name} was already built in {folder} ({counts} examples; --overwrite rebuilds btcv/msd)"
    return f"{name} ({counts} examples; {human_bytes(tree_bytes(folder))}) to {folder}"
