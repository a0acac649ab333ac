"""tokvis: see and measure what token reduction does inside Vision Transformers.

Patch any timm ViT with a reduction method, record every per-block decision,
analyse and plot the patterns::

    import tokvis
    model = tokvis.zoo.create("dinov2_small_offline")
    tokvis.patch(model, "tome", r=8)
    out, trace = tokvis.run_with_trace(model, images)
    trace.labels(trace.layers[-1])
"""

from tokvis import errors
from tokvis.methods import Method, create_method, list_methods, register_method
from tokvis.patching import is_patched, patch, unpatch
from tokvis.recording import record, report, run_with_trace
from tokvis.schedule import make_schedule
from tokvis.trace import LayerDecision, Trace, TraceMeta, load_trace

__version__ = "0.1.0"


def __getattr__(name: str):
    # heavier optional parts are imported on first use
    import importlib

    if name in ("zoo", "data", "plotting", "analysis", "adapters", "bench"):
        return importlib.import_module(f"tokvis.{name}")
    raise AttributeError(f"module 'tokvis' has no attribute {name!r}")


__all__ = [
    "LayerDecision",
    "Method",
    "Trace",
    "TraceMeta",
    "__version__",
    "create_method",
    "errors",
    "is_patched",
    "list_methods",
    "load_trace",
    "make_schedule",
    "patch",
    "record",
    "register_method",
    "report",
    "run_with_trace",
    "unpatch",
]
