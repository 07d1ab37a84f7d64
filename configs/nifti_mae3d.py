"""MAE3D self pre-training on a user's own NIfTI collection (``medmae-jax build nifti --name NAME``),
``pretrain`` split.

Args: ``dataset=NAME`` (the --name of the build; needed to train), ``data_dir=data`` (the --data-dir of the build),
``quick``, ``roi=96``, ``mask_ratio=0.75``, ``epochs=1000``.
The channel count comes from ``DATA_DIR/NAME/collection.json``.
Example: ``medmae-jax train --config configs/nifti_mae3d.py:dataset=mine,data_dir=data --workdir runs/mine_mae``.
"""

import os

from medmae_jax import config_base
from medmae_jax.data.datasets.collection_info import read_collection_info


def get_config(arg=None):
    args = config_base.parse_arg(arg, dataset="", data_dir="data", roi=96, mask_ratio=0.75, epochs=1000.0)
    # Without dataset=NAME the config is a template: training stops at the data with the build command to run.
    dataset_dir = os.path.join(args.data_dir, args.dataset) if args.dataset else ""
    info = read_collection_info(dataset_dir) if args.dataset else {"num_channels": 1}
    c = config_base.base_config()
    c.task = "pretrain"
    c.data.name = "nifti_collection"            # a collection built by medmae-jax build nifti
    c.data.tfds_name = "nifti_collection"       # TFDS name inside DATA_DIR/NAME
    c.data.data_dir = dataset_dir               # DATA_DIR/NAME (splits.json, collection.json, TFDS files)
    c.data.train_split = "pretrain"             # every image, labeled or not
    c.data.eval_split = "pretrain"              # reconstruction loss on the same images (no labels needed)
    c.model.variant, c.model.patch_size = "B", 16  # ViT-B, 3-D patch 16 (UNETR needs 16)
    c.model.spatial_dims, c.model.input_size = 3, (args.roi,) * 3  # ROI crops of the stored volumes
    c.model.in_channels = int(info["num_channels"])  # from collection.json
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 384, 8, 12  # as configs/btcv_mae3d.py
    c.model.mask_ratio = args.mask_ratio        # fraction of patches hidden from the encoder
    c.batch_size = 6                            # volumes per step
    c.num_epochs = args.epochs                  # epochs of the pretrain split
    c.optimizer.base_lr, c.optimizer.warmup_epochs = 1.5e-4 * 256 / 6, 40.0  # effective lr 1.5e-4 at batch 6
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05  # AdamW
    if args.quick:
        config_base.shrink_pretrain(c)          # tiny ViT, 30 steps at lr 2e-3
        c.model.input_size, c.model.patch_size = (32, 32, 32), 16
        c.batch_size = 2
        c.data.loader_threads = 2
        c.data.cache_gib = 0.0
    return c
