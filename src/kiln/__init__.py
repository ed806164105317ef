"""Kiln: a self-hosted multi-user machine-learning workbench."""

__version__ = "0.1.0"
