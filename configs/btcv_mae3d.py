"""Tables 2 and 4: MAE3D self pre-training on BTCV CT (ViT-B, 96^3 crops, patch 16, 1 channel, 216 tokens).

Args: ``quick``, ``data=synthetic`` (embedded abdominal phantoms), ``mask_ratio=0.75`` and ``epochs=10000``
(the Table 4 ablations, e.g. ``btcv_mae3d.py:mask_ratio=0.5``).
"""

from medmae_jax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="btcv", mask_ratio=0.75, epochs=10000.0)
    c = config_base.base_config()
    c.task = "pretrain"
    c.data.name = "btcv" if args.data != "synthetic" else "synthetic3d"
    c.data.tfds_name = "btcv/selfmedmae"        # built by: medmae-jax build btcv (RAS, 1.5x1.5x2 mm, HU window)
    c.data.volume_size = (112, 112, 112)        # synthetic stand-in size
    c.model.variant, c.model.patch_size = "B", 16
    c.model.spatial_dims, c.model.input_size, c.model.in_channels = 3, (96, 96, 96), 1
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 384, 8, 12
    c.model.mask_ratio = args.mask_ratio
    c.batch_size = 6
    c.num_epochs = args.epochs
    c.optimizer.base_lr, c.optimizer.warmup_epochs = 1.5e-4 * 256 / 6, 100.0  # effective lr 1.5e-4 at batch 6
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05
    if args.quick:
        config_base.shrink_pretrain(c)           # tiny ViT, 30 steps at lr 2e-3
        # patch 16 on a 2x2x2 grid, as configs/btcv_unetr.py:quick, so init=mae chains on this run's workdir
        c.data.volume_size, c.model.input_size, c.model.patch_size = (40, 40, 40), (32, 32, 32), 16
        c.data.num_train, c.data.num_eval = 8, 2
        c.batch_size = 2
    return c
