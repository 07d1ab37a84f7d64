"""UNETR fine-tuning for 3-D segmentation (BTCV multi-organ CT, MSD brain-tumour MRI): the paper's Tables 2/3.

The model is :class:`medmae_jax.models.unetr.UNETR` whose ViT takes the same
``config.model`` fields as MAE pre-training (width, depth, heads, patch,
qkv bias, LayerNorm eps), with the fine-tuning settings of SelfMedMAE / MONAI:
no cls token, a learnable position table, conv patch embedding. So an MAE from
``configs/btcv_mae3d.py`` (or ``brats_mae3d.py``) with the same model fields
maps parameter for parameter onto it (``config.init = "mae"``): the cls token
is dropped and the MAE's fixed sin-cos table becomes the learnable table's
starting value (:func:`medmae_jax.interop.finetune_init.encoder_init_from_mae`).

Two kinds of output (``config.segmentation.kind``):

- ``multiclass`` (BTCV): softmax over ``num_classes`` (background included),
  loss Dice + cross-entropy with MONAI ``DiceCELoss(to_onehot_y=True,
  softmax=True)`` semantics; prediction = argmax.
- ``regions`` (MSD): one sigmoid channel per tumour region (default order TC,
  WT, ET like MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``), regions
  built from the label map under ``label_convention``; loss MONAI
  ``DiceLoss(sigmoid=True)`` (``loss="dice_ce"`` adds binary cross-entropy; MONAI's
  ``DiceCELoss(sigmoid=True)`` would instead apply a softmax cross-entropy across
  the region channels); prediction = probability > ``threshold``.

The Dice settings (``squared_pred``, ``smooth_nr``/``smooth_dr``, ``batch_dice``,
``include_background``) default to MONAI's; the paper configs set SelfMedMAE's
(``squared_pred=True``, 0 / 1e-6).

Crops: each training example is one volume giving ``crops_per_volume`` ROI
crops (MONAI ``RandCropByPosNegLabeld``, centres foreground:background =
``pos:neg``), each augmented independently (flips per axis, rot90, intensity
scale/shift); the crops are stacked on a leading axis of the example and the
loss folds them into the batch. So ``batch_size`` counts volumes and one step
sees ``batch_size * crops_per_volume`` crops, exactly as SelfMedMAE's loader
(batch 6 x 4 crops), and one volume read serves all its crops.

Synthetic data (``data.name = "synthetic3d"``): the phantoms' label maps use
BTCV numbers (spleen 1, kidneys 2/3, liver 6, aorta 8) and serve the multiclass
configs directly. For the ``regions`` kind the phantom is turned into a
brain-tumour stand-in (:class:`SyntheticTumourSource`): liver -> 1 (edema),
spleen -> 2 (non-enhancing tumour), kidneys -> 3 (enhancing tumour), aorta ->
background (MSD dataset.json numbers), and ``model.in_channels`` intensity
channels derived from the one CT-like channel (x, x^2, sqrt(x), 1 - x inside
the body), z-scored on non-zero voxels like the MSD builder.

Evaluation (:mod:`medmae_jax.evaluate.segmentation_eval`) runs sliding windows over whole
volumes of the eval split on every process (each computes the same metrics); jitted
predictors are compiled once per volume shape and reused across evaluations.
"""

from medmae_jax.models.fast_init import fast_init_key
from medmae_jax.tasks.segmentation.config import KINDS, segmentation_config
from medmae_jax.tasks.segmentation.losses import dice_ce_loss, sigmoid_dice_bce_loss, sigmoid_dice_loss, soft_dice_loss
from medmae_jax.tasks.segmentation.model import build_unetr, init_from_mae
from medmae_jax.tasks.segmentation.synthetic import PHANTOM_TO_MSD, SyntheticTumourSource
from medmae_jax.tasks.segmentation.task import SegmentationTask
from medmae_jax.tasks.segmentation.train_transforms import make_train_transform, prepare_volume

__all__ = ["KINDS", "PHANTOM_TO_MSD", "SegmentationTask", "SyntheticTumourSource", "build_unetr", "dice_ce_loss",
           "fast_init_key", "init_from_mae", "make_train_transform", "prepare_volume", "segmentation_config",
           "sigmoid_dice_bce_loss", "sigmoid_dice_loss", "soft_dice_loss"]
