"""Tables 3 and 4: MAE3D self pre-training on MSD Task01 brain-tumour MRI (4 channels, 128^3 or 96^3 crops).

Args: ``quick``, ``data=synthetic``, ``roi=128`` (or 96), ``mask_ratio=0.75``, ``epochs=1000``.
"""

from medmae_jax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="msd_brain_tumour", roi=128, mask_ratio=0.75, epochs=1000.0)
    c = config_base.base_config()
    c.task = "pretrain"
    c.data.name = "msd_brain_tumour" if args.data != "synthetic" else "synthetic3d"
    c.data.tfds_name = "msd_brain_tumour/fold0"  # built by: medmae-jax build msd_brain_tumour (RAS, 1 mm, z-score)
    c.data.volume_size = (args.roi + 16,) * 3    # synthetic stand-in size
    c.model.variant, c.model.patch_size = "B", 16
    c.model.spatial_dims, c.model.input_size, c.model.in_channels = 3, (args.roi,) * 3, 4
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 384, 8, 12
    c.model.mask_ratio = args.mask_ratio
    c.batch_size = 6
    c.num_epochs = args.epochs
    c.optimizer.base_lr, c.optimizer.warmup_epochs = 1.5e-4 * 256 / 6, 10.0
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05
    if args.quick:
        config_base.shrink_pretrain(c)           # tiny ViT, 30 steps at lr 2e-3
        # patch 16 on a 2x2x2 grid, as configs/brats_unetr.py:quick, so init=mae chains on this run's workdir
        c.data.volume_size, c.model.input_size, c.model.patch_size = (40, 40, 40), (32, 32, 32), 16
        c.data.num_train, c.data.num_eval = 8, 2
        c.batch_size = 2
    return c
