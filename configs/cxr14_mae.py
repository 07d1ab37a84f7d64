"""Table 1: MAE self pre-training of ViT-B/16 on ChestX-ray14 (224 px, mask 0.75, 800 epochs).

Args (comma separated): ``quick`` (tiny model, few steps), ``data=synthetic`` (embedded chest-like images
instead of the built TFDS data set), ``mask_ratio=0.75``, ``epochs=800``.
"""

from medmae_jax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="chestxray14", mask_ratio=0.75, epochs=800.0)
    c = config_base.base_config()
    c.task = "pretrain"
    c.data.name = "chestxray14" if args.data != "synthetic" else "synthetic2d"
    c.data.tfds_name = "chestxray14/s256"      # built by: medmae-jax build chestxray14 (256 px at build time)
    c.data.image_size = (256, 256)             # synthetic stand-in size
    c.model.variant, c.model.patch_size = "B/16", 16
    c.model.spatial_dims, c.model.input_size = 2, (224, 224)
    c.model.in_channels = 3                    # the reference repeats gray to 3 channels
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 256, 8, 8
    c.model.mask_ratio = args.mask_ratio
    c.model.norm_pix_loss = True
    c.batch_size = 256
    c.num_epochs = args.epochs
    c.optimizer.base_lr, c.optimizer.warmup_epochs = 1.5e-4, 40.0
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05
    if args.quick:
        config_base.shrink_pretrain(c)         # tiny ViT, 30 steps at lr 2e-3
        c.data.image_size, c.model.input_size, c.model.patch_size = (40, 40), (32, 32), 8
        c.data.num_train, c.data.num_eval = 32, 8
    return c
