"""Reduction methods: one file per method, all registered by name.

Importing this package imports every module in it (except the shared
``base``, ``registry`` and ``ops``), so each method file registers itself with
``@register_method("name")`` and nothing else needs editing to add one.
"""

import importlib
import pkgutil

from tokvis.methods.base import Method, ModelInfo, ReductionContext
from tokvis.methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    parse_method_spec,
    register_method,
)

_SHARED = {"base", "registry", "ops"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _SHARED and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Method",
    "ModelInfo",
    "ReductionContext",
    "create_method",
    "get_method_class",
    "list_methods",
    "parse_method_spec",
    "register_method",
]
