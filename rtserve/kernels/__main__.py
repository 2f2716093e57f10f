"""`python -m rtserve.kernels`: build (or find) the native kernels ahead of the first server start."""
import logging
import sys

from rtserve import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
if kernels.native_available():
    print(f"native kernels ready: {kernels.build()}")
else:
    print("native kernels unavailable; the PyTorch fallbacks will be used", file=sys.stderr)
