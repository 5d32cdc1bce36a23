"""Shim for tools that still call setup.py; all metadata lives in pyproject.toml.

Later, the CUDA sources under csrc/ ship inside the wheel as package data (they are
compiled at run time, so no build step happens here)."""

from setuptools import setup

setup()
