"""medmae-jax build: prepare a data set from its manual download into a TFDS data_dir (array_record, no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

from medmae_jax.console import human_bytes, print_wrote, progress_enabled, tree_bytes

HELP = "build chestxray14 | btcv | msd_brain_tumour | nifti | images (your own data) into --data-dir"

DATASETS = ("chestxray14", "btcv", "msd_brain_tumour", "nifti", "images")


def add_arguments(parser):
    parser.add_argument("dataset", choices=DATASETS, help="which data set")
    parser.add_argument("--manual-dir", required=True, help="the unpacked manual download")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write (configs' data.data_dir)")
    parser.add_argument("--config", default=None,
                        help="builder config: btcv monai|selfmedmae (default monai; configs/btcv_*.py read "
                             "selfmedmae); msd_brain_tumour fold0..fold4 or fold<k>_monai (default fold0)")
    parser.add_argument("--image-size", type=int, default=None, help="chestxray14: stored image size (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="btcv/msd/nifti/images: rebuild even if already built")
    own = parser.add_argument_group("nifti: your own collection (datalist, nnU-Net folder or plain folder of volumes)")
    own.add_argument("--name", default=None, help="data set name: written to DATA_DIR/NAME (configs' dataset=NAME)")
    own.add_argument("--datalist", default=None, help="MSD/MONAI dataset.json (default: MANUAL_DIR/dataset.json if it "
                                                      "has a 'training' list, else nnU-Net imagesTr/ or every volume)")
    own.add_argument("--modality", choices=("ct", "mr"), default="ct",
                     help="default intensity rule (ct window / z-score)")
    own.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0), metavar=("X", "Y", "Z"),
                     help="target voxel size in mm (default 1.5 1.5 2.0)")
    own.add_argument("--intensity", default=None,
                     help="ct-window:LO,HI | percentile:P,Q | zscore-nonzero (default by --modality)")
    own.add_argument("--val-fraction", type=float, default=0.2, help="share of labeled patients for validation")
    own.add_argument("--folds", type=int, default=0, help="> 0: patient folds, --fold is validation")
    own.add_argument("--fold", type=int, default=0,
                     help="the validation fold when --folds > 0 or the datalist has folds")
    own.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle (splits.json keeps the result)")
    two = parser.add_argument_group("images: your own 2-D images (PNG/JPEG) with an optional label CSV")
    two.add_argument("--labels", default=None, help="CSV naming images and their labels (unnamed images: unlabeled)")
    two.add_argument("--image-column", default=None, help="CSV column naming the image (default Image Index or image)")
    two.add_argument("--label-columns", default=None, help="comma-separated 0/1 label columns")
    two.add_argument("--findings-column", default=None, help="a '|'-separated findings column (default Finding Labels)")
    two.add_argument("--patient-column", default=None, help="keeps each patient's images in one split")


def run(args, overrides) -> int:
    import tensorflow_datasets as tfds

    # TFDS draws the per-split example counters; the same rule as every other command decides whether they show.
    tfds.display_progress_bar(progress_enabled())
    started = time.time()
    before = _existing(args.data_dir)
    try:
        builder = _build(args)
    except BaseException:
        _remove_new(args.data_dir, before)  # a failed build leaves no partial data set folder behind
        raise
    splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
    print(json.dumps({"dataset": _full_name(builder), "data_dir": args.data_dir,
                      "splits": splits}))
    print_wrote([built_output(builder, splits, started)])
    return 0


# Depth of data_dir/NAME/CONFIG/VERSION/...: what a build creates lies within it.
_DEPTH = 4


def _existing(data_dir: str) -> set[str] | None:
    """Paths under ``data_dir`` down to the data set version folders (None: ``data_dir`` does not exist yet)."""
    if not os.path.isdir(data_dir):
        return None
    found, root_depth = set(), os.path.abspath(data_dir).rstrip(os.sep).count(os.sep)
    for here, dirs, files in os.walk(os.path.abspath(data_dir)):
        found.update(os.path.join(here, n) for n in dirs + files)
        if here.count(os.sep) - root_depth >= _DEPTH - 1:
            dirs[:] = []
    return found


def _remove_new(data_dir: str, before: set[str] | None) -> None:
    """Remove what appeared under ``data_dir`` since ``before`` (all of it if ``data_dir`` is new)."""
    import shutil
    if before is None:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for path in sorted((_existing(data_dir) or set()) - before, key=len):
        if path in before or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _build(args):
    from medmae_jax.errors import ConfigError
    if args.dataset == "chestxray14":
        if args.config:
            raise ConfigError("chestxray14 has no --config; use --image-size")
        from medmae_jax.data.datasets.chestxray14 import build_chestxray14
        kw = {} if args.image_size is None else {"image_size": args.image_size}
        builder = build_chestxray14(args.manual_dir, args.data_dir, **kw)
    elif args.dataset == "nifti":
        builder = _build_nifti(args)
    elif args.dataset == "images":
        builder = _build_images(args)
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
    return builder


def _build_nifti(args):
    from medmae_jax.data.datasets import collection_splits
    from medmae_jax.data.datasets import nifti_collection_builder as ncb
    from medmae_jax.errors import ConfigError
    if not args.name:
        raise ConfigError("build nifti needs --name NAME (the data set folder under --data-dir)")
    if args.config or args.image_size is not None:
        raise ConfigError("build nifti takes --spacing/--intensity/--val-fraction/--folds, not --config/--image-size")
    intensity = args.intensity or ncb.DEFAULT_INTENSITY[args.modality]
    ncb.parse_intensity(intensity)
    prep = ncb.Preprocessing(spacing=tuple(args.spacing), intensity=intensity)
    rule = collection_splits.SplitRule(val_fraction=args.val_fraction, folds=args.folds, fold=args.fold, seed=args.seed)
    return ncb.build_nifti_collection(args.manual_dir, args.data_dir, args.name, datalist=args.datalist,
                                      preprocessing=prep, rule=rule, overwrite=args.overwrite)


def _build_images(args):
    from medmae_jax.data.datasets import collection_splits, image_folder
    from medmae_jax.errors import ConfigError
    if not args.name:
        raise ConfigError("build images needs --name NAME (the data set folder under --data-dir)")
    rule = collection_splits.SplitRule(val_fraction=args.val_fraction, folds=args.folds, fold=args.fold, seed=args.seed)
    columns = tuple(c.strip() for c in args.label_columns.split(",")) if args.label_columns else ()
    csv_kwargs = {"image_column": args.image_column, "label_columns": columns,
                  "findings_column": args.findings_column, "patient_column": args.patient_column}
    return image_folder.build_image_folder(args.manual_dir, args.data_dir, args.name, labels_csv=args.labels,
                                           image_size=args.image_size or 256, rule=rule, overwrite=args.overwrite,
                                           **(csv_kwargs if args.labels else {}))


def _full_name(builder) -> str:
    """``btcv/selfmedmae``; a builder without named configs (nifti collections) goes by its folder name."""
    if builder.builder_config is None:
        return f"{os.path.basename(os.path.normpath(os.fspath(builder._data_dir_root)))}/{builder.name}"
    return f"{builder.name}/{builder.builder_config.name}"


def built_output(builder, splits: dict, started: float) -> str:
    """The final line's part: the data set folder with its examples per split and size, or that it was reused."""
    folder = os.path.abspath(os.fspath(builder.data_dir))
    counts = ", ".join(f"{name} {n}" for name, n in splits.items())
    info = os.path.join(folder, "dataset_info.json")
    name = f"{_full_name(builder)} {builder.version}"
    if os.path.isfile(info) and os.path.getmtime(info) < started:
        hint = "delete the folder to rebuild" if builder.name == "chestxray14" else "--overwrite rebuilds it"
        return f"nothing new: {name} was already built in {folder} ({counts} examples; {hint})"
    return f"{name} ({counts} examples; {human_bytes(tree_bytes(folder))}) to {folder}"
