"""Packaging beyond pyproject.toml's metadata: ship the C/CUDA sources of ``csrc/`` inside
the package as ``spar/csrc/`` (package data of a ``spar.csrc`` package mapped onto the
top-level directory). They are compiled at run time on the machine that uses them
(:mod:`spar._native`), so no build step happens here. In a source checkout or an editable
install, spar finds the top-level ``csrc/`` next to the package instead."""

from setuptools import find_packages, setup

CSRC_PATTERNS = ["*.h", "*.c", "*.cu", "*.cuh", "*.cpp", "*.hpp"]

setup(
    packages=[*find_packages(include=["spar", "spar.*"]), "spar.csrc"],
    package_dir={"spar.csrc": "csrc"},
    package_data={"spar.csrc": CSRC_PATTERNS},
)
