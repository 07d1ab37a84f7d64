"""Packages: every ``medmae_jax*`` package plus the top-level ``configs/`` shipped as ``medmae_jax.configs``."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["medmae_jax*"]) + ["medmae_jax.configs"])
