"""Read chest X-ray PNGs as 8-bit grayscale and resize them (Pillow only, no TensorFlow).

ChestX-ray14 ships 8-bit grayscale PNGs, a few RGBA ones, and users sometimes
convert their copies to RGB or 16-bit. Everything here ends as a 2-D uint8
array so every image of a data set is preprocessed the same way.

Conversion rules (one place, documented):

* ``L`` (8-bit gray): unchanged. ``1`` (bilevel): 0/255.
* ``RGB``, ``RGBA``, ``LA``, ``P`` (palette), ``CMYK``, ...: alpha is dropped
  (never composited), then Pillow's ``"L"`` conversion, i.e. ITU-R 601-2 luma
  ``L = R*299/1000 + G*587/1000 + B*114/1000`` (rounded as Pillow does).
  The two RGBA images of the NIH release have ``R == G == B``, so they keep
  their gray values exactly.
* 16-bit / 32-bit integer or float gray (``I;16*``, ``I``, ``F``): scaled to
  0..255 by the image's own value range,
  ``round((v - min) * 255 / (max - min))``; a constant image becomes all zeros.
  (A 16-bit PNG made from an 8-bit original is therefore a plain contrast
  stretch, not a silent truncation to the high byte.) 16-bit *colour* PNGs are
  reduced to 8 bits per channel by Pillow's own decoder, then follow the colour
  rule.

Resizing (:func:`resize_square`) keeps the aspect ratio: the shorter side is
resized to ``size`` with Pillow's antialiased BILINEAR filter (a triangle filter
whose support widens with the reduction factor, so downscaling averages every
source pixel) and the centre is cropped to ``size x size``. For the square
1024x1024 NIH images this is a plain resize, and it is exactly what
``torchvision.transforms.Resize(size)`` does on a PIL image in the reference
PyTorch pipelines (SelfMedMAE, medical_mae).
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from medmae_jax.errors import DataError

PathOrBytes = Union[str, os.PathLike, bytes]

_HIGH_DEPTH_MODES = ("I", "F")  # Pillow modes of >8-bit single-channel images, by their first letter


def _open(source: PathOrBytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _name(source: PathOrBytes) -> str | None:
    return None if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def to_gray_uint8(image: Image.Image) -> np.ndarray:
    """Return a PIL image as a 2-D uint8 array following the module's conversion rules."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith(_HIGH_DEPTH_MODES):
        values = np.asarray(image)
        if values.ndim != 2:
            raise ValueError(f"unsupported {mode} image with shape {values.shape}")
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{mode} image has non-finite values")
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            return np.zeros(values.shape, np.uint8)
        return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0), dtype=np.uint8)  # drop alpha, keep the gray band
    if mode in ("RGBA", "RGBa", "P", "PA"):
        image = image.convert("RGB")  # drop alpha / expand the palette; alpha is never composited
    return np.asarray(image.convert("L"), dtype=np.uint8)


def read_png_gray(source: PathOrBytes) -> np.ndarray:
    """Decode a PNG (path or bytes) to a 2-D uint8 grayscale array; DataError names the file if unreadable."""
    try:
        with _open(source) as image:
            if image.format != "PNG":
                raise DataError(_name(source), f"not a PNG file (Pillow reads it as {image.format})")
            image.load()
            return to_gray_uint8(image)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(_name(source), f"unreadable PNG: {e}") from e


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side of a 2-D uint8 image to ``size`` (antialiased BILINEAR), centre-crop to size x size."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = gray.shape
    if (h, w) == (size, size):
        return gray.copy()
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = Image.fromarray(gray).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def encode_png(gray: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()
