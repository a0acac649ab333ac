"""tokvis: see and measure what token reduction does inside Vision Transformers.

Patch any timm ViT with a reduction method, record every per-block decision,
analyse and plot the patterns::

    import tokvis
    model = tokvis.zoo.create("dinov2_small_offline")
    tokvis.patch(model, "tome", r=8)
    out, trace = tokvis.run_with_trace(model, images)
    trace.labels(trace.layers[-1])

Names are imported on first use, so ``tokvis.analysis`` works without loading
torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from tokvis import errors

__version__ = "0.2.0.dev0"

# public name -> module defining it
_EXPORTS = {
    "LayerDecision": "tokvis.trace",
    "Trace": "tokvis.trace",
    "TraceMeta": "tokvis.trace",
    "load_trace": "tokvis.trace",
    "Method": "tokvis.methods",
    "create_method": "tokvis.methods",
    "list_methods": "tokvis.methods",
    "register_method": "tokvis.methods",
    "patch": "tokvis.patching",
    "unpatch": "tokvis.patching",
    "is_patched": "tokvis.patching",
    "record": "tokvis.recording",
    "report": "tokvis.recording",
    "run_with_trace": "tokvis.recording",
    "make_schedule": "tokvis.schedule",
    "fit": "tokvis.fitting",
    "load_run": "tokvis.store",
    "explore": "tokvis.viewer",
}
_SUBMODULES = ("zoo", "data", "plotting", "analysis", "attention", "adapters", "bench", "methods", "trace", "cli")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # any submodule: tokvis.zoo, tokvis.patching, ...
    raise AttributeError(f"module 'tokvis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    # ruff: noqa: F401
    from tokvis.fitting import fit
    from tokvis.methods import Method, create_method, list_methods, register_method
    from tokvis.patching import is_patched, patch, unpatch
    from tokvis.recording import record, report, run_with_trace
    from tokvis.schedule import make_schedule
    from tokvis.store import load_run
    from tokvis.trace import LayerDecision, Trace, TraceMeta, load_trace
    from tokvis.viewer import explore

__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "__version__",
    "errors",
    "LayerDecision",
    "Trace",
    "TraceMeta",
    "load_trace",
    "Method",
    "create_method",
    "list_methods",
    "register_method",
    "patch",
    "unpatch",
    "is_patched",
    "record",
    "report",
    "run_with_trace",
    "make_schedule",
    "fit",
    "load_run",
    "explore",
]
