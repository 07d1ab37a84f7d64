"""medmae-jax predict: segment NIfTI volumes with a checkpoint; the label map is written in the input's geometry.

The config saved with the checkpoint says how to preprocess, exactly as the data set builder
did (``medmae_jax/data/datasets/btcv.py`` / ``msd_brain_tumour.py``: RAS, target spacing,
intensity window or z-score, foreground crop), then sliding windows, argmax (multiclass) or
sigmoid > threshold (regions, turned back into the label convention's values: MSD 1 edema,
2 non-enhancing, 3 enhancing), and the label map is put back on the input file's own grid:
same shape and affine (header copied from the first input).

Inputs: one 3-D CT (BTCV); a user's collection (``build nifti``): what its images were, preprocessed as
recorded in its ``collection.json``, labels written with its own values; one 4-D MRI (MSD, 4 channels) or four
3-D files in the channel order
FLAIR, T1w, t1gd, T2w. Configs trained on ``synthetic3d`` use the BTCV (multiclass) or MSD
(regions) preprocessing.
"""

from __future__ import annotations

import json
import os
import tempfile

from medmae_jax.console import file_output, print_wrote, progress_bar

HELP = "segment NIfTI file(s) with a checkpoint; writes a label map with the input's shape and affine"


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a training workdir, its best/ folder or a step folder")
    parser.add_argument("--best", action="store_true", help="use <checkpoint>/best")
    parser.add_argument("--input", action="append", required=True,
                        help="input NIfTI (repeat for MSD's four 3-D files: FLAIR, T1w, t1gd, T2w)")
    parser.add_argument("--output", required=True, help="output label map (.nii.gz)")
    parser.add_argument("--config", default=None, help="override the checkpoint's config with this config file")


def preprocessing(config) -> tuple[str, object]:
    """(``btcv`` | ``msd``, the builder config) that built the data this config trains on."""
    from medmae_jax.data.datasets import btcv
    from medmae_jax.data.datasets import msd_brain_tumour as msd
    from medmae_jax.errors import ConfigError
    name, kind = config.data.name, config.segmentation.kind
    tfds_name = config.data.get("tfds_name", "") or ""
    if name == "btcv" or (name == "synthetic3d" and kind == "multiclass"):
        family, builder = "btcv", btcv.Btcv
    elif name == "msd_brain_tumour" or (name == "synthetic3d" and kind == "regions"):
        family, builder = "msd", msd.MsdBrainTumour
    else:
        raise ConfigError(f"predict: no NIfTI preprocessing known for data.name={name!r}")
    wanted = tfds_name.split("/", 1)[1] if "/" in tfds_name and tfds_name.startswith(("btcv", "msd_brain_tumour")) \
        else builder.DEFAULT_CONFIG_NAME
    configs = {c.name: c for c in builder.BUILDER_CONFIGS}
    return family, configs.get(wanted, configs[builder.DEFAULT_CONFIG_NAME])


def _stack_channels(paths, tmpdir: str, channels: int) -> str:
    """Several 3-D files on one grid -> one 4-D NIfTI in ``tmpdir`` (errors name the offending file)."""
    import nibabel as nib
    import numpy as np

    from medmae_jax.data import nifti
    from medmae_jax.errors import DataError
    if len(paths) != channels:
        raise DataError(paths[0], f"{len(paths)} input files given; the model takes {channels} channels "
                                  f"(one 4-D file or {channels} 3-D files)")
    volumes, affine = [], None
    for p in paths:
        data, aff = nifti.read_nifti(p, channels=None, dtype=np.float32)
        if affine is None:
            affine, first, shape = aff, p, data.shape
        else:
            nifti.check_same_grid(first, shape, affine, p, data.shape, aff)
        volumes.append(data)
    out = os.path.join(tmpdir, "stacked.nii")
    nib.save(nib.Nifti1Image(np.stack(volumes, -1), affine), out)
    return out


def preprocess(config, paths, tmpdir: str) -> tuple:
    """(image ``(X, Y, Z, C)`` float32, :class:`~medmae_jax.data.nifti.Geometry`) exactly as the builder makes it."""
    from medmae_jax.data import nifti
    from medmae_jax.data.datasets import btcv
    from medmae_jax.data.datasets import msd_brain_tumour as msd
    from medmae_jax.errors import DataError
    if config.data.name == "nifti_collection":  # a user's collection: preprocessing recorded in its collection.json
        from medmae_jax.data.datasets import nifti_collection_builder as ncb
        ex = ncb.preprocess_files(paths, ncb.read_collection_info(config.data.data_dir))
        return ex["image"], nifti.Geometry.from_features(ex)
    family, builder_config = preprocessing(config)
    channels = int(config.model.in_channels)
    if family == "btcv":
        if len(paths) != 1:
            raise DataError(paths[1], "BTCV models take one 3-D CT volume; give one --input")
        ex = btcv.preprocess(paths[0], None, builder_config)
    else:
        path = paths[0] if len(paths) == 1 else _stack_channels(paths, tmpdir, channels)
        ex = msd.preprocess(path, None, builder_config, channels=channels,
                            label_values=tuple(range(4)))
    return ex["image"], nifti.Geometry.from_features(ex)


def run(args, overrides) -> int:
    import numpy as np

    from medmae_jax.cli.evaluate import checkpoint_path, load_config
    from medmae_jax.data import nifti
    from medmae_jax.data.labels import regions_to_label
    from medmae_jax.errors import ConfigError, DataError
    from medmae_jax.tasks import get_task
    from medmae_jax.train.checkpoint import load_params
    path = checkpoint_path(args.checkpoint, args.best)
    args.checkpoint = path
    config = load_config(args, overrides)
    if config.task != "segmentation":
        raise ConfigError(f"predict needs a segmentation checkpoint; {path} was trained for task {config.task!r}")
    for p in args.input:
        if not os.path.isfile(p):
            raise DataError(p, "input file not found")
    nifti.check_output_path(args.output)  # before minutes of inference
    # One bar over the four stages; the sliding window (compile + all windows) is one jitted call.
    with progress_bar(total=len(STAGES), desc="predict", unit="stage") as bar:
        bar.set_postfix_str(STAGES[0], refresh=True)
        with tempfile.TemporaryDirectory() as tmpdir:  # inputs first: a bad file fails before the model is built
            image, geometry = preprocess(config, args.input, tmpdir)
        _next_stage(bar, 1)
        task = get_task(config)
        params, meta = load_params(task, path)
        _next_stage(bar, 2, f" ({num_windows(config, image.shape[:3])} windows of {tuple(config.model.input_size)})")
        pred = task.predict(params, image)
        s = config.segmentation
        labels = pred if s.kind == "multiclass" else regions_to_label(pred, tuple(s.regions), s.label_convention)
        if config.data.name == "nifti_collection":  # class indices -> the collection's own label values
            from medmae_jax.data.datasets import nifti_collection_builder as ncb
            labels = ncb.class_indices_to_values(labels, ncb.read_collection_info(config.data.data_dir))
        _next_stage(bar, 3)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)) or ".", exist_ok=True)
        written = nifti.write_nifti(args.output, labels.astype(np.uint8), geometry, mode="nearest", dtype=np.uint8,
                                    reference=args.input[0])
        bar.update(1)
    values, counts = np.unique(written, return_counts=True)
    print(json.dumps({"output": os.path.abspath(args.output), "shape": list(written.shape),
                      "checkpoint_step": meta.get("step"),
                      "voxels_per_label": {int(v): int(c) for v, c in zip(values, counts)}}))
    print_wrote([file_output(f"a label map {tuple(written.shape)}", os.path.abspath(args.output))])
    return 0


STAGES = ("reading and preprocessing the input", "restoring the checkpoint", "sliding-window inference",
          "writing the label map")


def _next_stage(bar, index: int, detail: str = "") -> None:
    bar.update(1)
    bar.set_postfix_str(STAGES[index] + detail, refresh=True)


def num_windows(config, spatial) -> int:
    """Sliding windows the config's ROI and overlap lay over a volume of ``spatial`` size."""
    from medmae_jax.evaluate.sliding_window import window_plan
    plan = window_plan(tuple(int(x) for x in spatial), tuple(config.model.input_size),
                       float(config.segmentation.sw_overlap))
    return plan.num_windows
