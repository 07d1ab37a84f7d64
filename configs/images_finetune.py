"""Multi-label fine-tuning (mean ROC-AUC) on a user's own 2-D image folder with a label CSV (``build images --labels``).

Args: ``dataset=NAME`` (the --name of the build; needed to train), ``data_dir=data``, ``init=scratch|mae``,
``init_checkpoint=PATH`` (the workdir of ``configs/images_mae.py``), ``quick``, ``epochs=75``. Class count and
names come from ``DATA_DIR/NAME/collection.json``.
Example: ``medmae-jax train --config configs/images_finetune.py:dataset=myxr,init=mae,init_checkpoint=runs/myxr_mae``.
"""

import os

from medmae_jax import config_base
from medmae_jax.data.datasets.collection_info import read_collection_info
from medmae_jax.errors import ConfigError
from medmae_jax.tasks.classification import classification_config


def get_config(arg=None):
    args = config_base.parse_arg(arg, dataset="", data_dir="data", init="scratch", init_checkpoint="", epochs=75.0)
    if args.init not in ("scratch", "mae"):
        raise ConfigError(f"images_finetune.py: init must be scratch or mae, got {args.init!r}")
    # Without dataset=NAME the config is a template: training stops at the data with the build command to run.
    dataset_dir = os.path.join(args.data_dir, args.dataset) if args.dataset else ""
    info = read_collection_info(dataset_dir) if args.dataset else {"image_size": 256, "class_names": ["finding"]}
    if args.dataset and not info["class_names"]:
        raise ConfigError(f"{dataset_dir}: no labels were built; rebuild with --labels labels.csv")
    c = config_base.base_config()
    c.task = "classification"
    c.init = args.init                         # scratch | mae (encoder from configs/images_mae.py)
    c.init_checkpoint = args.init_checkpoint   # init=mae: pre-training workdir or checkpoint directory
    c.data.name = "image_folder"               # a folder built by medmae-jax build images
    c.data.tfds_name = "image_folder"          # TFDS name inside DATA_DIR/NAME
    c.data.data_dir = dataset_dir              # DATA_DIR/NAME (splits.json, collection.json, TFDS files)
    c.data.train_split, c.data.eval_split = "train", "validation"  # labeled, patient-disjoint (splits.json)
    c.data.image_size = (int(info["image_size"]),) * 2  # stored size (build --image-size)
    c.model.variant, c.model.patch_size = "B/16", 16
    c.model.spatial_dims, c.model.input_size = 2, (224, 224)
    c.model.in_channels = 3                    # gray repeated to 3 channels (as configs/images_mae.py)
    c.model.drop_path = 0.1                    # stochastic depth of the last block
    c.classification = classification_config()
    c.classification.num_classes = len(info["class_names"])  # from collection.json
    c.classification.label_names = tuple(info["class_names"])  # output order = collection.json order
    c.batch_size = 64                          # images per step
    c.num_epochs = args.epochs                 # epochs of the train split
    c.optimizer.base_lr, c.optimizer.warmup_epochs, c.optimizer.min_lr = 1e-3, 5.0, 1e-6  # for batch 256
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.999, 0.05  # AdamW
    c.optimizer.layer_decay = 0.75             # layer-wise lr decay over the encoder
    c.eval_every_steps = 500                   # validation mean AUC every N steps; the best goes to workdir/best
    if args.quick:
        config_base.shrink(c)                  # tiny ViT, 6 steps
        c.model.input_size, c.model.patch_size = (32, 32), 8
        c.data.cache_gib = 0.0
        c.eval_every_steps = -1
        c.checkpoint.async_save = False
    return c
