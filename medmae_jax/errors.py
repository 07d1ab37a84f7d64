"""Errors the user can act on: each names the file (or key) and what is wrong with it."""

from __future__ import annotations

import os
from typing import Optional


class MedMAEError(Exception):
    """Base class of the project's user-facing errors."""


class DataError(MedMAEError, ValueError):
    """A bad input file: unreadable, wrong dimensionality, shape/affine mismatch, labels out of range, ..."""

    def __init__(self, path: Optional[os.PathLike | str], problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(MedMAEError, ValueError):
    """A configuration that cannot work (unknown key, inconsistent sizes, missing data directory)."""


class ConversionError(MedMAEError, ValueError):
    """A checkpoint that does not fit the model: names the key and both shapes."""


class EncoderMismatchError(ConfigError, ConversionError):
    """A pre-trained encoder that does not fit the encoder of the model being fine-tuned (both tasks raise it)."""


class NonFiniteError(MedMAEError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""
