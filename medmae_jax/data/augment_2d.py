"""Fine-tuning augmentation for 2-D chest X-rays (numpy + Pillow, per example, in the loader threads).

Train view = random resized crop -> horizontal flip -> a RandAugment-style policy;
evaluation view = resize the shorter side to ``size / crop_fraction`` then take the
centre ``size`` crop (``Resize(256) + CenterCrop(224)`` at 224 px; other input sizes
keep the 224/256 ratio, e.g. 64 -> 56).

RandAugment policy (after timm's ``rand-m9-mstd0.5-inc1``, the MAE / medical_mae
fine-tuning default, restricted to operations that keep an X-ray an X-ray):
``num_ops`` operations (default 2) are drawn uniformly *with replacement* from
:data:`RANDAUG_OPS`; each is applied with probability ``prob`` (0.5) at magnitude
``m ~ N(magnitude, magnitude_std)`` clipped to [0, 10] (default 9 +- 0.5), drawn per
op. At magnitude ``m`` (``f = m / 10``), with a random sign where marked +-:

=============  ================================================================
AutoContrast   stretch the image's own min..max to 0..255 (no magnitude)
Equalize       histogram equalisation (no magnitude)
Rotate         +-30 f degrees about the centre, bilinear
ShearX/ShearY  +-0.3 f shear, bilinear
TranslateX/Y   +-0.45 f of the image width / height
Contrast       enhance factor 1 +- 0.9 f (Pillow ImageEnhance)
Brightness     enhance factor 1 +- 0.9 f
Sharpness      enhance factor 1 +- 0.9 f
Posterize      keep 8 - round(4 f) bits (m = 9: 4 bits)
=============  ================================================================

Areas uncovered by geometric ops are filled with 0 (black, like the film border).
Left out of timm's list on purpose: Invert, Solarize, SolarizeAdd (they reverse the
attenuation scale of a radiograph) and Color (a no-op on gray images).
Everything is drawn from the ``numpy.random.Generator`` the loader passes in, so an
example's view depends only on (seed, stream position).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from medmae_jax.errors import ConfigError

MAX_MAGNITUDE = 10.0
FILL = 0


def _pil(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L")


def _affine(img: Image.Image, matrix) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, tuple(matrix), resample=Image.Resampling.BILINEAR,
                         fillcolor=FILL)


def _signed(f: float, rng: np.random.Generator) -> float:
    return -f if rng.random() < 0.5 else f


def _rotate(img, f, rng):
    return img.rotate(_signed(30.0 * f, rng), resample=Image.Resampling.BILINEAR, fillcolor=FILL)


def _shear_x(img, f, rng):
    return _affine(img, (1, _signed(0.3 * f, rng), 0, 0, 1, 0))


def _shear_y(img, f, rng):
    return _affine(img, (1, 0, 0, _signed(0.3 * f, rng), 1, 0))


def _translate_x(img, f, rng):
    return _affine(img, (1, 0, _signed(0.45 * f, rng) * img.size[0], 0, 1, 0))


def _translate_y(img, f, rng):
    return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * f, rng) * img.size[1]))


def _enhance(kind):
    def op(img, f, rng):
        return kind(img).enhance(max(1.0 + _signed(0.9 * f, rng), 0.0))
    return op


def _posterize(img, f, rng):
    return ImageOps.posterize(img, int(8 - round(4 * f)))


RANDAUG_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, f, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, f, rng: ImageOps.equalize(img),
    "Rotate": _rotate,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "Posterize": _posterize,
}
DEFAULT_OPS = tuple(RANDAUG_OPS)


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    bad = [o for o in ops if o not in RANDAUG_OPS]
    if bad:
        raise ConfigError(f"unknown RandAugment ops {bad}; known: {list(RANDAUG_OPS)}")
    return tuple(ops)


def apply_op(gray: np.ndarray, name: str, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """One named op on a 2-D uint8 image at ``magnitude`` in [0, 10] (sign drawn from ``rng`` where it has one)."""
    f = float(np.clip(magnitude, 0.0, MAX_MAGNITUDE)) / MAX_MAGNITUDE
    return np.asarray(RANDAUG_OPS[name](_pil(gray), f, rng), dtype=np.uint8)


def rand_augment(gray: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, ops: Sequence[str] = DEFAULT_OPS) -> np.ndarray:
    """The policy of the module docstring on a 2-D uint8 image."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"rand_augment expects a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if num_ops <= 0 or not ops:
        return gray
    names = list(ops)
    img = _pil(gray)
    for k in rng.integers(0, len(names), size=int(num_ops)):
        if rng.random() >= prob:
            continue
        m = magnitude + (rng.normal() * magnitude_std if magnitude_std > 0 else 0.0)
        f = float(np.clip(m, 0.0, MAX_MAGNITUDE)) / MAX_MAGNITUDE
        img = RANDAUG_OPS[names[int(k)]](img, f, rng)
    return np.asarray(img, dtype=np.uint8)


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W[, C]) uint8 -> (size[0], size[1][, C]) with Pillow's antialiased BILINEAR filter."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[:2]) == size:
        return image
    if image.ndim == 2:
        return np.asarray(_pil(image).resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    return np.stack([resize(image[..., c], size) for c in range(image.shape[-1])], axis=-1)


def random_resized_crop(image: np.ndarray, size: Sequence[int], rng: np.random.Generator,
                        scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop: area fraction ~ U(scale), log-uniform aspect, 10 tries, else centre crop."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return resize(image[top:top + ch, left:left + cw], size)
    # Fallback (torchvision): the whole image clamped to the ratio range, centred.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(image[top:top + ch, left:left + cw], size)


def eval_view(image: np.ndarray, size: Sequence[int], crop_fraction: float = 224 / 256) -> np.ndarray:
    """Resize the shorter side to ``round(max(size) / crop_fraction)``, then the centre ``size`` crop."""
    size = (int(size[0]), int(size[1]))
    h, w = image.shape[:2]
    short = int(round(max(size) / crop_fraction))
    if min(h, w) != short:
        scale = short / min(h, w)
        image = resize(image, (max(short, int(round(h * scale))), max(short, int(round(w * scale)))))
        h, w = image.shape[:2]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return np.ascontiguousarray(image[top:top + size[0], left:left + size[1]])


def train_view(image: np.ndarray, size: Sequence[int], rng: np.random.Generator, *,
               scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
               randaug: Optional[dict] = None) -> np.ndarray:
    """(H, W, C) uint8 -> random resized crop -> flip with probability ``hflip`` -> RandAugment (each channel alike)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"train_view expects an (H, W, C) uint8 image, got {image.dtype} {image.shape}")
    out = random_resized_crop(image, size, rng, scale, ratio)
    if hflip > 0 and rng.random() < hflip:
        out = out[:, ::-1]
    if randaug and randaug.get("num_ops", 0) > 0:
        if out.shape[-1] != 1:
            # Colour inputs: apply the same draw to every channel by re-seeding a child generator per channel.
            seed = int(rng.integers(0, 2**63 - 1))
            out = np.stack([rand_augment(np.ascontiguousarray(out[..., c]), np.random.default_rng(seed), **randaug)
                            for c in range(out.shape[-1])], axis=-1)
        else:
            out = rand_augment(np.ascontiguousarray(out[..., 0]), rng, **randaug)[..., None]
    return np.ascontiguousarray(out)
