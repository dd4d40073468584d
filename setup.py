"""Build shim: the package is declared in pyproject.toml (PEP 621); this file holds no metadata."""
from setuptools import setup

setup()
