"""Import hygiene: analysis works without torch; the public API is reachable from the top package."""

import subprocess
import sys


def test_analysis_does_not_load_torch():
    code = (
        "import sys, tokvis, tokvis.analysis.patterns, tokvis.analysis.maps, tokvis.analysis.features, "
        "tokvis.analysis.correlation; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_api_names():
    import tokvis

    for name in tokvis.__all__:
        assert getattr(tokvis, name) is not None
    assert callable(tokvis.zoo.create)
