"""bear_kernels' version: the distribution's (bear-rec), kept equal to ``bear._version`` (which
setup.py reads) by tests/test_packaging.py; bear_kernels imports nothing of bear."""

__version__ = "0.2.0"
