"""A ``synthetic3d`` phantom source dressed as MSD brain-tumour data, for the ``regions`` kind on synthetic
data: liver -> edema, spleen -> non-enhancing tumour, kidneys -> enhancing tumour, aorta -> background, and
``model.in_channels`` intensity channels derived from the one CT-like channel, z-scored on non-zero voxels.
"""

from __future__ import annotations

import numpy as np

from medmae_jax.data import transforms

# Synthetic phantom organ (BTCV number) -> MSD dataset.json label, for the ``regions`` stand-in.
PHANTOM_TO_MSD = {6: 1, 1: 2, 2: 3, 3: 3}


class SyntheticTumourSource:
    """A ``synthetic3d`` phantom source dressed as MSD brain-tumour data (see the module docstring)."""

    def __init__(self, source, channels: int):
        self.source, self.channels = source, int(channels)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        ex = dict(self.source[index])
        x = ex["image"][..., 0]
        body = x > 0.05
        candidates = [x, x * x, np.sqrt(x), (1.0 - x) * body]
        chans = [candidates[c % len(candidates)] for c in range(self.channels)]
        ex["image"] = transforms.normalize_nonzero(np.stack(chans, -1).astype(np.float32), channel_axis=-1)
        label = np.zeros_like(ex["label"])
        for organ, value in PHANTOM_TO_MSD.items():
            label[ex["label"] == organ] = value
        ex["label"] = label
        return ex
