"""MAE self pre-training on a user's own 2-D image folder (``medmae-jax build images --name NAME``), ``pretrain`` split.

Args: ``dataset=NAME`` (the --name of the build; needed to train), ``data_dir=data``, ``quick``, ``mask_ratio=0.75``,
``epochs=800``. Images are stored gray at the build's --image-size; the model sees the gray value in 3 channels.
Example: ``medmae-jax train --config configs/images_mae.py:dataset=myxr --workdir runs/myxr_mae``.
"""

import os

from medmae_jax import config_base
from medmae_jax.data.datasets.collection_info import read_collection_info


def get_config(arg=None):
    args = config_base.parse_arg(arg, dataset="", data_dir="data", mask_ratio=0.75, epochs=800.0)
    # Without dataset=NAME the config is a template: training stops at the data with the build command to run.
    dataset_dir = os.path.join(args.data_dir, args.dataset) if args.dataset else ""
    info = read_collection_info(dataset_dir) if args.dataset else {"image_size": 256}
    c = config_base.base_config()
    c.task = "pretrain"
    c.data.name = "image_folder"               # a folder built by medmae-jax build images
    c.data.tfds_name = "image_folder"          # TFDS name inside DATA_DIR/NAME
    c.data.data_dir = dataset_dir              # DATA_DIR/NAME (splits.json, collection.json, TFDS files)
    c.data.train_split = "pretrain"            # every image, labeled or not
    c.data.eval_split = "pretrain"             # reconstruction loss on the same images
    c.data.image_size = (int(info["image_size"]),) * 2  # stored size (build --image-size)
    c.model.variant, c.model.patch_size = "B/16", 16
    c.model.spatial_dims, c.model.input_size = 2, (224, 224)
    c.model.in_channels = 3                    # gray repeated to 3 channels (as configs/cxr14_mae.py)
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 256, 8, 8
    c.model.mask_ratio = args.mask_ratio       # fraction of patches hidden from the encoder
    c.batch_size = 256                         # images per step
    c.num_epochs = args.epochs                 # epochs of the pretrain split
    c.optimizer.base_lr, c.optimizer.warmup_epochs = 1.5e-4, 40.0  # for batch 256, linear scaling
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05  # AdamW
    if args.quick:
        config_base.shrink_pretrain(c)         # tiny ViT, 30 steps at lr 2e-3
        c.model.input_size, c.model.patch_size = (32, 32), 8
        c.data.cache_gib = 0.0
    return c
