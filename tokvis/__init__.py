"""tokvis: see and measure what token reduction does inside Vision Transformers."""

from tokvis import errors

__version__ = "0.1.0"
__all__ = ["errors", "__version__"]
