"""ntklab: empirical neural tangent kernels of real networks on real image data."""

__version__ = "0.1.0"
