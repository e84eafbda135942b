"""Builds fastddpm (pure Python for now; the compiled extension comes with the CPU kernels)."""
from setuptools import setup

setup()
