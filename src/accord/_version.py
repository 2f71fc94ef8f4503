"""The installed version of accord."""

__version__ = "0.1.0"
