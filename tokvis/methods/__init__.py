"""Reduction methods: one file per method, all registered by name.

Importing this package registers the built-in methods.
"""

# built-in methods (import for the registration side effect)
from tokvis.methods import evit, tome, topk  # noqa: F401,E402
from tokvis.methods.base import Method, ModelInfo, ReductionContext
from tokvis.methods.registry import create_method, get_method_class, list_methods, register_method

__all__ = [
    "Method",
    "ModelInfo",
    "ReductionContext",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
