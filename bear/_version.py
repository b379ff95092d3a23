"""The package version: one source, read by setup.py and exported as ``bear.__version__`` and
``bear_kernels.__version__``."""

__version__ = "0.2.0"
