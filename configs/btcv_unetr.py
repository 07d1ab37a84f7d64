"""Table 2: UNETR fine-tuning on BTCV CT (13 organs), from scratch or from a BTCV MAE3D (self pre-training).

Args (comma separated): ``init=scratch|mae``, ``init_checkpoint=PATH`` (the MAE pre-training workdir of
``configs/btcv_mae3d.py``, or a checkpoint directory; needed for ``init=mae``), ``quick`` (tiny model, a few
steps), ``data=synthetic`` (embedded abdominal phantoms with BTCV-numbered labels), ``split=selfmedmae|monai``
(18/12 or 24/6 cases), ``roi=96``, ``epochs=5000``. Recipe: SelfMedMAE ``configs/unetr_btcv_1gpu.yaml``.
Example: ``medmae-jax train --config configs/btcv_unetr.py:init=mae,init_checkpoint=runs/btcv_mae3d``.
"""

from medmae_jax import config_base
from medmae_jax.errors import ConfigError
from medmae_jax.tasks.segmentation import segmentation_config


def get_config(arg=None):
    args = config_base.parse_arg(arg, data="btcv", init="scratch", init_checkpoint="", split="selfmedmae", roi=96,
                                 epochs=5000.0)
    if args.init not in ("scratch", "mae"):
        raise ConfigError(f"btcv_unetr.py: init must be scratch or mae, got {args.init!r}")
    c = config_base.base_config()
    c.task = "segmentation"
    c.init = args.init                          # scratch | mae (encoder from an MAE3D pre-training)
    c.init_checkpoint = args.init_checkpoint    # init=mae: pre-training workdir or checkpoint directory
    c.data.name = "btcv" if args.data != "synthetic" else "synthetic3d"
    c.data.tfds_name = f"btcv/{args.split}"     # built by: medmae-jax build btcv --config selfmedmae|monai
    c.data.volume_size = (args.roi + 16,) * 3   # synthetic stand-in size
    c.data.num_train, c.data.num_eval = 18, 12  # synthetic stand-in: as many volumes as the SelfMedMAE split
    c.data.loader_threads = 6                   # whole volumes are read, cropped 4 times and augmented per example
    # Encoder: the same fields as configs/btcv_mae3d.py so init=mae maps one to one (qkv bias and LayerNorm eps
    # of MAE/timm; a converted MONAI UNETR would need qkv_bias=False, layer_norm_eps=1e-5).
    c.model.variant, c.model.patch_size = "B", 16   # ViT-B, 3-D patch 16 (UNETR needs 16)
    c.model.spatial_dims, c.model.input_size, c.model.in_channels = 3, (args.roi,) * 3, 1  # 96^3 ROI, CT
    c.model.drop_path = 0.1                     # stochastic depth of the last block (fine-tuning recipe)
    c.segmentation = segmentation_config(
        kind="multiclass", num_classes=14,      # background + 13 organs, softmax
        feature_size=16,                        # UNETR decoder width
        loss="dice_ce",                         # DiceCELoss(to_onehot_y, softmax) ...
        squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6,  # ... SelfMedMAE's settings (MONAI: False, 1e-5, 1e-5)
        crops_per_volume=4, pos=1.0, neg=1.0,   # RandCropByPosNegLabeld(num_samples=4, pos=1, neg=1)
        sw_overlap=0.5, sw_mode="constant",     # infer_overlap 0.5
    )
    c.batch_size = 6                            # volumes per step (x 4 crops = 24 crops)
    c.num_epochs = args.epochs                  # 5000 epochs of the train split
    c.optimizer.base_lr = 4.3e-3                # x 6 / 256 = 1.0e-4 effective (SelfMedMAE lr 4.3e-3, batch 6)
    c.optimizer.warmup_epochs = 50.0            # linear warmup, then cosine
    c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05  # AdamW
    c.optimizer.layer_decay = 0.75              # layer-wise lr decay over the encoder
    c.eval_every_steps = 300                    # 100 epochs of 18 cases at batch 6 (SelfMedMAE eval_freq 100)
    c.checkpoint.every_steps = 1000             # periodic checkpoints; the best mean Dice goes to workdir/best
    if args.quick:
        config_base.shrink(c)                   # width 48, depth 2, 3 heads, batch 4, 6 steps
        c.model.input_size = (32, 32, 32)       # 2x2x2 patch grid of 16
        c.data.volume_size = (40, 40, 40)
        c.data.num_train, c.data.num_eval = 4, 2
        c.data.loader_threads = 2
        c.batch_size = 2
        c.segmentation.feature_size = 8
        c.segmentation.skip_layers = (0, 1, 1)  # depth 2: skips from blocks 1, 2, 2
        c.segmentation.crops_per_volume = 2
        c.segmentation.sw_batch_size = 2          # few padded windows (CPU time per window is flat in the batch)
        c.segmentation.sw_overlap = 0.0         # each voxel predicted once: sliding windows dominate CPU time
        c.eval_every_steps = -1
    return c
