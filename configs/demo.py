"""Embedded demo: small 2-D and 3-D MAEs on the synthetic data (``:2d`` or ``:3d``; ``quick`` shrinks further)."""

from medmae_jax.demo import get_config  # noqa: F401  (the demo's settings live with the demo command)
