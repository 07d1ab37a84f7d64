"""Per-volume preparation (foreground/background indices) and the random train transform: pos/neg crops,
each augmented independently, stacked on a leading axis.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from medmae_jax.data import transforms


def prepare_volume(example: dict, image_threshold: Optional[float]) -> dict:
    """Channels-last float32 image plus the foreground/background voxel indices of positive/negative crop
    sampling: the per-volume work of the train transform that does not depend on the random draw."""
    image = np.ascontiguousarray(np.asarray(example["image"], np.float32))
    if image.ndim == 3:
        image = image[..., None]
    label = np.asarray(example["label"])
    out = dict(example, image=image, label=label)
    if label.shape == image.shape[:3]:
        fg, bg = transforms.fg_bg_indices(label, None if image_threshold is None else image,
                                          0.0 if image_threshold is None else float(image_threshold))
        index_dtype = np.int32 if label.size < 2 ** 31 else np.int64
        out["fg_indices"], out["bg_indices"] = fg.astype(index_dtype), bg.astype(index_dtype)
    return out


def make_train_transform(config, target_of: Callable[[np.ndarray], np.ndarray]):
    """Per-volume random transform: ``crops_per_volume`` pos/neg ROI crops, each flipped/rotated/intensity-jittered.

    Returns ``{"image": (N, *roi, C) float32, "target": (N, *roi) uint8 or (N, *roi, R) uint8}``.
    """
    s = config.segmentation
    roi = tuple(int(r) for r in config.model.input_size)
    n = int(s.crops_per_volume)
    threshold = None if s.image_threshold is None else float(s.image_threshold)
    max_label = int(s.num_classes) - 1 if s.kind == "multiclass" else None
    rotate = roi[0] == roi[1]  # a 90-degree turn of a non-square ROI would change the crop's shape

    def transform(example: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(example["image"], np.float32)
        label = np.asarray(example["label"])
        if image.ndim == 3:
            image = image[..., None]
        name = example.get("case_id", example.get("index", "?"))
        if label.shape != image.shape[:3]:
            raise ValueError(f"example {name!r}: label {label.shape} and image {image.shape} differ in spatial shape")
        if max_label is not None and label.size and int(label.max()) > max_label:
            raise ValueError(f"example {name!r}: label value {int(label.max())} >= segmentation.num_classes "
                             f"{max_label + 1}")
        indices = (example["fg_indices"], example["bg_indices"]) if "fg_indices" in example else None
        images, labels = transforms.rand_crop_by_pos_neg_label(rng, image, label, roi, n, pos=float(s.pos),
                                                               neg=float(s.neg), image_threshold=threshold,
                                                               indices=indices)
        out_images, out_targets = [], []
        for img, lab in zip(images, labels):
            img, lab = transforms.random_flip(rng, [img, lab], prob=float(s.flip_prob))
            if rotate:
                img, lab = transforms.random_rot90(rng, [img, lab], prob=float(s.rot90_prob))
            img = transforms.random_scale_intensity(rng, img, float(s.scale_intensity_factor),
                                                    float(s.scale_intensity_prob))
            img = transforms.random_shift_intensity(rng, img, float(s.shift_intensity_offset),
                                                    float(s.shift_intensity_prob))
            out_images.append(np.ascontiguousarray(img, np.float32))
            out_targets.append(np.ascontiguousarray(target_of(np.asarray(lab))).astype(np.uint8))
        return {"image": np.stack(out_images), "target": np.stack(out_targets)}

    return transform
