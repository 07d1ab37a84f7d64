"""Table 3: UNETR fine-tuning on MSD Task01 brain-tumour MRI (WT/TC/ET), from scratch or from an MSD MAE3D.

Args (comma separated): ``init=scratch|mae``, ``init_checkpoint=PATH`` (the MAE pre-training workdir of
``configs/brats_mae3d.py`` with the same ``roi``, or a checkpoint directory), ``quick``, ``data=synthetic``
(phantoms dressed as 4-channel brain-tumour data, see medmae_jax/tasks/segmentation/synthetic.py), ``roi=128`` (or 96),
``labels=msd|monai_tutorial`` (ET = {3} as dataset.json says, or ET = {2} as MONAI's tutorial and SelfMedMAE),
``fold=0``, ``epochs=400``. Recipe: SelfMedMAE ``configs/unetr_msdbrats_1gpu.yaml``.
"""

from medmae_jax import config_base
from medmae_jax.errors import ConfigError
from medmae_jax.tasks.segmentation import segmentation_config


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="msd_brain_tumour", init="scratch", init_checkpoint="", roi=128,
                                 labels="msd", fold=0, epochs=400.0)
    if args.init not in ("scratch", "mae"):
        raise ConfigError(f"brats_unetr.py: init must be scratch or mae, got {args.init!r}")
    c = config_base.base_config()
    c.task = "segmentation"
    c.init = args.init                          # scratch | mae (encoder from an MAE3D pre-training)
    c.init_checkpoint = args.init_checkpoint    # init=mae: pre-training workdir or checkpoint directory
    c.data.name = "msd_brain_tumour" if args.data != "synthetic" else "synthetic3d"
    c.data.tfds_name = f"msd_brain_tumour/fold{args.fold}"  # built by: medmae-jax build msd_brain_tumour
    c.data.volume_size = (args.roi + 16,) * 3   # synthetic stand-in size
    c.data.num_train, c.data.num_eval = 24, 6   # synthetic stand-in sizes
    # Encoder: the same fields as configs/brats_mae3d.py so init=mae maps one to one.
    c.model.variant, c.model.patch_size = "B", 16   # ViT-B, 3-D patch 16
    c.model.spatial_dims, c.model.input_size, c.model.in_channels = 3, (args.roi,) * 3, 4  # FLAIR, T1w, t1gd, T2w
    c.model.drop_path = 0.1                     # stochastic depth (fine-tuning recipe)
    c.segmentation = segmentation_config(
        kind="regions", regions=("TC", "WT", "ET"),  # sigmoid per region, MONAI's channel order
        label_convention=args.labels,           # msd: ET = {3} (dataset.json); monai_tutorial: ET = {2}
        feature_size=16,                        # UNETR decoder width
        loss="dice",                            # DiceLoss(sigmoid=True) ...
        squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6,  # ... with SelfMedMAE's settings
        crops_per_volume=1, pos=1.0, neg=1.0,   # RandCropByPosNegLabeld(num_samples=1)
        sw_overlap=0.5, sw_mode="constant", sw_batch_size=2,  # infer_overlap 0.5
    )
    c.batch_size = 6                            # volumes per step
    c.num_epochs = args.epochs                  # 400 epochs
    c.optimizer.base_lr = 3.44e-2               # x 6 / 256 = 8.1e-4 effective (SelfMedMAE lr 3.44e-2, batch 6)
    c.optimizer.warmup_epochs = 10.0            # linear warmup, then cosine
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05  # AdamW
    c.optimizer.layer_decay = 0.75              # layer-wise lr decay over the encoder
    c.eval_every_steps = 640                    # ~10 epochs of 387 cases at batch 6 (SelfMedMAE eval_freq 10)
    c.checkpoint.every_steps = 640              # periodic checkpoints; the best mean Dice goes to workdir/best
    if args.quick:
        config_base.shrink(c)                   # width 48, depth 2, 3 heads, batch 4, 6 steps
        c.model.input_size = (32, 32, 32)
        c.data.volume_size = (40, 40, 40)
        c.data.num_train, c.data.num_eval = 4, 2
        c.batch_size = 2
        c.segmentation.feature_size = 8
        c.segmentation.skip_layers = (0, 1, 1)  # depth 2: skips from blocks 1, 2, 2
        c.segmentation.sw_batch_size = 2          # few padded windows (CPU time per window is flat in the batch)
        c.segmentation.sw_overlap = 0.0         # each voxel predicted once: sliding windows dominate CPU time
        c.eval_every_steps = -1
    return c
