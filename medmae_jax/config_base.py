"""Shared pieces of the ``configs/*.py`` files: the full default config and ``:arg`` parsing.

Every field has a default and a comment. Config files start from
:func:`base_config`, set what their paper row needs, and call :func:`shrink`
for ``:quick`` (seconds on a CPU).
"""

from __future__ import annotations

import ml_collections

from medmae_jax.errors import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``"quick,init=mae,mask_ratio=0.5"`` -> ConfigDict(quick=True, init="mae", mask_ratio=0.5).

    Only keys present in ``defaults`` (plus ``quick``) are accepted; values take the default's type.
    """
    out = dict(quick=False, **defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in out:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(out)}")
        if not eq:
            out[key] = True
            continue
        out[key] = _typed_arg(key, value, out[key])
    return ml_collections.ConfigDict(out)


def _typed_arg(key: str, value: str, default):
    """``value`` in the type of ``default``; a value that does not fit is a one-line ConfigError."""
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config argument :{key}={value}: expected a boolean (true/false)")
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"config argument :{key}={value}: expected {kind} (default {default})") from None
        if isinstance(default, int):
            if number != int(number):
                raise ConfigError(f"config argument :{key}={value}: expected an integer (default {default})")
            return int(number)
        return number
    return value


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "pretrain"            # pretrain | segmentation | classification (medmae_jax/tasks/)
    c.seed = 0                     # seeds init, masking, dropout and the data order
    c.batch_size = 256             # global batch over all devices and hosts
    c.num_epochs = 800.0           # training length in epochs of the train split ...
    c.num_train_steps = -1         # ... unless > 0: exact number of steps (overrides num_epochs)
    c.log_every_steps = 50         # metrics to metrics.jsonl / TensorBoard every N steps
    c.eval_every_steps = -1        # evaluation every N steps (<= 0: only at the end)
    c.progress_bar = True          # tqdm bar with steps/s and ETA on stderr (off with --no-progress or no terminal)
    c.summary_images = True        # TensorBoard images at each evaluation (MAE reconstructions, segmentation overlays)
    c.init = "scratch"             # fine-tuning init: scratch | mae (a pre-training workdir or checkpoint) | imagenet
    c.init_checkpoint = ""         # path for init=mae|imagenet: a workdir, an orbax checkpoint step, or a converted dir

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic2d"    # synthetic2d | synthetic3d | chestxray14 | btcv | msd_brain_tumour
    c.data.tfds_name = ""          # TFDS name/config to open (default: data.name)
    c.data.data_dir = ""           # TFDS data_dir holding the built data set (medmae-jax build ...)
    c.data.train_split = "train"   # split used for training
    c.data.eval_split = "validation"  # split used for evaluation
    c.data.num_train = 512         # synthetic only: examples in the train split
    c.data.num_eval = 64           # synthetic only: examples in the eval split
    c.data.image_size = (224, 224)         # 2-D: model input size (H, W)
    c.data.volume_size = (96, 96, 96)      # 3-D synthetic: stored volume size (D, H, W)
    c.data.synthetic_noise = 1.0   # 2-D synthetic: scale of the unpredictable mottle and pixel noise
    c.data.synthetic_shading = 0.0  # 2-D synthetic: amplitude of a smooth exposure ramp across the image (0: none)
    c.data.pixel_mean = 0.5        # 2-D uint8 images: (x / 255 - mean) / std before the model
    c.data.pixel_std = 0.25        # see pixel_mean
    c.data.loader_threads = 4      # threads decoding/augmenting examples
    c.data.worker_processes = 0    # > 0: spawned processes build whole batches (no GIL; same batches as threads)
    c.data.prefetch = 2            # batches prepared ahead
    c.data.cache_gib = 4.0         # per-host memory for decoded training examples (0: read from disk every time)

    c.model = ml_collections.ConfigDict()
    c.model.variant = "B/16"       # ViT size Ti|S|M|B|L|H with optional /patch
    c.model.patch_size = 16        # patch edge (same on every axis)
    c.model.width = 0              # > 0 overrides the variant's width
    c.model.depth = 0              # > 0 overrides the variant's depth
    c.model.num_heads = 0          # > 0 overrides the variant's heads
    c.model.mlp_dim = 0            # > 0 overrides the variant's MLP width
    c.model.in_channels = 1        # image channels the model sees
    c.model.spatial_dims = 2       # 2 (images) or 3 (volumes)
    c.model.input_size = (224, 224)  # model input (crop) size per spatial axis
    c.model.qkv_bias = True        # bias in the fused qkv projection (timm/MAE: True, MONAI: False)
    c.model.layer_norm_eps = 1e-6  # LayerNorm epsilon (timm/MAE 1e-6, MONAI 1e-5)
    c.model.drop_path = 0.0        # stochastic depth rate of the last block (linear over depth)
    c.model.dropout = 0.0          # dropout in MLPs and after the position table
    c.model.remat = "none"         # recompute blocks in the backward pass: none | full | dots_saveable | ...
    c.model.dtype = "auto"         # compute: auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16 | float64 (x64 on)
    c.model.param_dtype = "float32"  # storage dtype of parameters (optimizer state and weight gradients follow)
    c.model.attention = "auto"     # attention kernel: auto (cuDNN on GPU in 16-bit, XLA elsewhere) | xla | cudnn
    c.model.scan_blocks = False    # nn.scan over encoder/decoder blocks: compiles once, same checkpoint layout
    c.model.decoder_width = 512    # MAE decoder width
    c.model.decoder_depth = 8      # MAE decoder blocks
    c.model.decoder_heads = 16     # MAE decoder heads
    c.model.mask_ratio = 0.75      # MAE: fraction of tokens hidden from the encoder
    c.model.norm_pix_loss = True   # MAE: per-patch normalised targets

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.base_lr = 1.5e-4   # lr for a batch of 256 (peak lr = base_lr * batch / 256 with linear scaling)
    c.optimizer.lr_scaling = "linear"  # linear | none
    c.optimizer.min_lr = 0.0       # floor of the cosine decay
    c.optimizer.warmup_epochs = 40.0  # linear warmup length in epochs ...
    c.optimizer.warmup_steps = -1  # ... unless >= 0: in steps
    c.optimizer.b1 = 0.9           # AdamW beta1
    c.optimizer.b2 = 0.95          # AdamW beta2
    c.optimizer.eps = 1e-8         # AdamW epsilon
    c.optimizer.weight_decay = 0.05  # decoupled weight decay (not on biases, norms, tokens, position tables)
    c.optimizer.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
    c.optimizer.layer_decay = 1.0  # layer-wise lr decay (fine-tuning 0.75; 1 = off)
    c.optimizer.num_layers = 0     # encoder depth for layer decay (0 = model depth)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1               # data-parallel axis size (-1: fill with the remaining devices)
    c.mesh.fsdp = 1                # parameter-sharding axis size
    c.sharding_rules = ()          # logical axis -> mesh axis pairs; () = medmae_jax.train.mesh.DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # periodic save interval (the last step is always saved)
    c.checkpoint.keep = 3          # keep the newest K checkpoints
    c.checkpoint.async_save = True  # write in the background while training goes on

    c.distributed = ml_collections.ConfigDict()  # multi-process runs (medmae_jax/train/distributed.py)
    c.distributed.enabled = False  # join with jax.distributed.initialize (a plain distributed=True means this)
    c.distributed.coordinator_address = ""  # host:port of process 0 ("": $MEDMAE_COORDINATOR_ADDRESS or auto)
    c.distributed.num_processes = -1  # processes in the run (-1: $MEDMAE_NUM_PROCESSES or auto-detected)
    c.distributed.process_id = -1  # this process's index (-1: $MEDMAE_PROCESS_ID or auto-detected)
    c.distributed.local_device_ids = ()  # devices this process uses (() = all visible)
    return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``:quick``: a tiny model and a few steps, for tests and CPUs."""
    c.model.variant = "Ti"
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 48, 2, 3, 96
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 48, 1, 3
    c.batch_size = 4
    c.num_train_steps = 6
    c.log_every_steps = 2
    c.checkpoint.every_steps = 3
    c.optimizer.warmup_steps = 2
    return c


def shrink_pretrain(c: ml_collections.ConfigDict, steps: int = 30, lr: float = 2e-3) -> ml_collections.ConfigDict:
    """``:quick`` MAE pre-training: ``shrink`` plus enough steps and a peak lr (not scaled by the tiny batch) for the
    loss to fall visibly (last 10 steps <= 0.9x the first 10)."""
    shrink(c)
    c.num_train_steps = steps
    c.checkpoint.every_steps = 10
    c.optimizer.lr_scaling = "none"  # base_lr x 4/256 would be ~1e-6 at these batch sizes: nothing is learnt
    c.optimizer.base_lr = lr
    return c
