"""Builds fused_adamw (pure Python for now; the compiled module comes with the CUDA issue)."""

from setuptools import setup

setup()
