"""UNETR fine-tuning on a user's own NIfTI collection (``medmae-jax build nifti --name NAME``): train/validation splits.

Args: ``dataset=NAME`` (the --name of the build; needed to train), ``data_dir=data``, ``init=scratch|mae``,
``init_checkpoint=PATH`` (the workdir of ``configs/nifti_mae3d.py``; needed for ``init=mae``), ``quick``, ``roi=96``,
``epochs=1000``. Channel and class counts come from ``DATA_DIR/NAME/collection.json``; the encoder fields match
``configs/nifti_mae3d.py`` so ``init=mae`` maps one to one.
Example: ``medmae-jax train --config configs/nifti_unetr.py:dataset=mine,init=mae,init_checkpoint=runs/mine_mae``.
"""

import os

from medmae_jax import config_base
from medmae_jax.data.datasets.collection_info import read_collection_info
from medmae_jax.errors import ConfigError
from medmae_jax.tasks.segmentation import segmentation_config


def get_config(arg=None):
    args = config_base.parse_arg(arg, dataset="", data_dir="data", init="scratch", init_checkpoint="", roi=96,
                                 epochs=1000.0)
    if args.init not in ("scratch", "mae"):
        raise ConfigError(f"nifti_unetr.py: init must be scratch or mae, got {args.init!r}")
    # Without dataset=NAME the config is a template: training stops at the data with the build command to run.
    dataset_dir = os.path.join(args.data_dir, args.dataset) if args.dataset else ""
    info = read_collection_info(dataset_dir) if args.dataset else {"num_channels": 1, "num_classes": 2}
    if args.dataset and int(info["num_classes"]) < 2:
        raise ConfigError(f"{dataset_dir}: the collection has no labeled case (num_classes "
                          f"{info['num_classes']}); UNETR needs a datalist or nnU-Net labelsTr/")
    c = config_base.base_config()
    c.task = "segmentation"
    c.init = args.init                          # scratch | mae (encoder from configs/nifti_mae3d.py)
    c.init_checkpoint = args.init_checkpoint    # init=mae: pre-training workdir or checkpoint directory
    c.data.name = "nifti_collection"            # a collection built by medmae-jax build nifti
    c.data.tfds_name = "nifti_collection"       # TFDS name inside DATA_DIR/NAME
    c.data.data_dir = dataset_dir               # DATA_DIR/NAME (splits.json, collection.json, TFDS files)
    c.data.train_split, c.data.eval_split = "train", "validation"  # labeled, patient-disjoint (splits.json)
    c.model.variant, c.model.patch_size = "B", 16   # ViT-B, 3-D patch 16 (as configs/nifti_mae3d.py)
    c.model.spatial_dims, c.model.input_size = 3, (args.roi,) * 3  # ROI crops
    c.model.in_channels = int(info["num_channels"])  # from collection.json
    c.model.drop_path = 0.1                     # stochastic depth of the last block (fine-tuning recipe)
    c.segmentation = segmentation_config(
        kind="multiclass", num_classes=int(info["num_classes"]),  # background included, from collection.json
        feature_size=16,                        # UNETR decoder width
        loss="dice_ce",                         # DiceCELoss(to_onehot_y, softmax)
        crops_per_volume=4, pos=1.0, neg=1.0,   # RandCropByPosNegLabeld(num_samples=4, pos=1, neg=1)
        sw_overlap=0.5, sw_mode="constant",     # sliding-window evaluation
    )
    c.batch_size = 2                            # volumes per step (x 4 crops)
    c.num_epochs = args.epochs                  # epochs of the train split
    c.optimizer.base_lr = 1e-4 * 256 / 8        # effective lr 1e-4 at 8 crops
    c.optimizer.warmup_epochs = 50.0            # linear warmup, then cosine
    c.optimizer.layer_decay = 0.75              # layer-wise lr decay over the encoder
    c.eval_every_steps = 500                    # validation Dice every N steps; the best goes to workdir/best
    if args.quick:
        config_base.shrink(c)                   # width 48, depth 2, 3 heads, 6 steps
        c.model.input_size = (32, 32, 32)       # 2x2x2 patch grid of 16
        c.data.loader_threads = 2
        c.data.cache_gib = 0.0
        c.batch_size = 1
        c.segmentation.feature_size = 8
        c.segmentation.skip_layers = (0, 1, 1)  # depth 2: skips from blocks 1, 2, 2
        c.segmentation.crops_per_volume = 2
        c.segmentation.sw_batch_size = 2
        c.segmentation.sw_overlap = 0.0
        c.eval_every_steps = -1
    return c
