"""The ``config.segmentation`` section: its fields, each with the MONAI / SelfMedMAE setting it mirrors."""

from __future__ import annotations

import ml_collections

from medmae_jax.errors import ConfigError
from medmae_jax.models.unetr import MONAI_SKIP_LAYERS

KINDS = ("multiclass", "regions")


def segmentation_config(**overrides) -> ml_collections.ConfigDict:
    """The ``config.segmentation`` section, MONAI defaults (BTCV multiclass); ``overrides`` set fields."""
    s = ml_collections.ConfigDict()
    s.kind = "multiclass"          # multiclass (softmax over classes; BTCV) | regions (sigmoid per region; MSD)
    s.num_classes = 14             # multiclass: output channels = classes with background (BTCV: 14)
    s.regions = ("TC", "WT", "ET")  # regions: output channel order (MONAI / SelfMedMAE order)
    s.label_convention = "msd"     # regions: msd (ET={3}) | monai_tutorial (ET={2}) | brats (1/2/4 labels)
    s.feature_size = 16            # UNETR decoder width f (channels f, 2f, 4f, 8f)
    s.skip_layers = MONAI_SKIP_LAYERS  # 0-based blocks feeding the skips: MONAI (3, 6, 9); paper's z3/6/9 (2, 5, 8)
    s.res_block = True             # residual conv blocks in the decoder (MONAI res_block)
    s.conv_block = True            # conv blocks between the projection upsamplings (MONAI conv_block)
    s.pos_embed_init = "normal"    # learnable position table at init=scratch: normal (MONAI trunc-normal .02) | sincos
    s.loss = "dice_ce"             # dice_ce (Dice + cross-entropy, softmax) | dice (Dice only; sigmoid for regions)
    s.include_background = True    # multiclass Dice over the background channel too (MONAI default True)
    s.squared_pred = False         # Dice denominator sum(p^2) + sum(g^2) (True in SelfMedMAE; MONAI default False)
    s.smooth_nr = 1e-5             # Dice numerator smoothing (MONAI default 1e-5; SelfMedMAE 0)
    s.smooth_dr = 1e-5             # Dice denominator smoothing (MONAI default 1e-5; SelfMedMAE 1e-6)
    s.batch_dice = False           # Dice over the whole batch instead of per sample (MONAI batch=False)
    s.lambda_dice = 1.0            # weight of the Dice term
    s.lambda_ce = 1.0              # weight of the cross-entropy term (dice_ce)
    s.crops_per_volume = 4         # ROI crops per volume per step (SelfMedMAE BTCV 4, MSD 1)
    s.pos = 1.0                    # crop centres on foreground : background = pos : neg
    s.neg = 1.0                    # see pos
    s.image_threshold = 0.0        # crop centres only where the image > threshold (MONAI image_key/image_threshold)
    s.flip_prob = 0.2              # flip probability, independently per spatial axis
    s.rot90_prob = 0.2             # probability of a k*90 degree rotation (k in 1..3) in the first two axes
    s.scale_intensity_prob = 0.1   # probability of x * (1 + f), f ~ U(-factor, factor)
    s.scale_intensity_factor = 0.1  # see scale_intensity_prob
    s.shift_intensity_prob = 0.1   # probability of x + o, o ~ U(-offset, offset)
    s.shift_intensity_offset = 0.1  # see shift_intensity_prob
    s.sw_overlap = 0.5             # sliding-window overlap at evaluation (references: 0.5)
    s.sw_mode = "constant"         # sliding-window blending: constant | gaussian
    s.sw_batch_size = 4            # windows per model call in sliding-window inference
    s.threshold = 0.5              # regions: a voxel is in a region when its sigmoid > threshold
    s.eval_limit = -1              # volumes evaluated during training (-1: the whole eval split, 0: no evaluation)
    s.eval_hd95 = False            # also HD95 during training evaluations (slow; `medmae-jax evaluate` always does it)
    s.fast_init = True             # initial params from a cheap hash generator (threefry init: ~20 s compile on CPU)
    for key, value in overrides.items():
        if key not in s:
            raise ConfigError(f"segmentation_config: unknown field {key!r}")
        s[key] = value
    return s
