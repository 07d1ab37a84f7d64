"""Table 1: ViT-B/16 fine-tuning on ChestX-ray14 (14-label BCE, mean per-class ROC-AUC), from scratch, ImageNet
weights, or an MAE self pre-trained on ChestX-ray14 (configs/cxr14_mae.py).

Args (comma separated): ``init=scratch|imagenet|mae``; ``init_checkpoint=PATH`` (mae: a pre-training workdir or
checkpoint; imagenet: a PyTorch ViT-B/16 file in timm / FAIR-MAE layout, .pth needs torch, .npz / .safetensors do
not); ``quick`` (tiny model, a few steps; matches ``cxr14_mae.py:quick`` so ``init=mae`` works on its workdir);
``data=synthetic`` (embedded chest-like images); ``epochs=100``.

Recipe (SelfMedMAE / MAE fine-tuning): 100 epochs, 5 warmup, batch 256, base lr 1e-3 (x batch / 256), AdamW
(0.9, 0.999), weight decay 0.05, layer-wise lr decay 0.75, drop path 0.1; 224 px crops of the 256 px build,
random resized crop + flip + RandAugment (m9, 2 ops); evaluation Resize(256) + CenterCrop(224).
"""

from medmae_jax import config_base
from medmae_jax.tasks.classification import classification_config


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="chestxray14", init="scratch", init_checkpoint="", epochs=100.0)
    c = config_base.base_config()
    c.task = "classification"
    c.init = args.init
    c.init_checkpoint = args.init_checkpoint
    c.data.name = "chestxray14" if args.data != "synthetic" else "synthetic2d"
    c.data.tfds_name = "chestxray14/s256"      # built by: medmae-jax build chestxray14 (256 px at build time)
    c.data.image_size = (256, 256)             # synthetic stand-in size
    c.data.train_split, c.data.eval_split = "train", "validation"  # the final report: evaluate on "test"
    c.model.variant, c.model.patch_size = "B/16", 16
    c.model.spatial_dims, c.model.input_size = 2, (224, 224)
    c.model.in_channels = 3                    # gray repeated to 3 channels (as the reference; ImageNet weights)
    c.model.drop_path = 0.1
    c.classification = classification_config()
    c.batch_size = 256
    c.num_epochs = args.epochs
    c.optimizer.base_lr, c.optimizer.warmup_epochs, c.optimizer.min_lr = 1e-3, 5.0, 1e-6
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.999, 0.05
    c.optimizer.layer_decay = 0.75
    c.eval_every_steps = 1000                  # ~3 epochs of the 78k-image train split at batch 256
    if args.init == "imagenet":
        # ImageNet statistics (mean of the RGB means/stds, as the gray value is repeated in the three channels).
        c.data.pixel_mean, c.data.pixel_std = 0.449, 0.226
    if args.quick:
        config_base.shrink(c)
        c.data.image_size, c.model.input_size, c.model.patch_size = (40, 40), (32, 32), 8
        c.data.num_train, c.data.num_eval = 32, 32
        c.eval_every_steps = -1
        c.checkpoint.async_save = False
    return c
