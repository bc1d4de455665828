"""The library's version: written into every export file (``library_version``); kept equal to
pyproject.toml's."""

__version__ = "0.1.0"
