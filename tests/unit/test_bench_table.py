"""tokvis.bench.format_rows: the printed table stays aligned whatever the config labels."""

from __future__ import annotations

from tokvis.bench import BenchRow, format_rows


def _row(label: str) -> BenchRow:
    return BenchRow(label, 12.5, 6.02, 2.03, 2.06, 1.01, 12.4, 1.012, 0.868)


def test_columns_align_with_long_labels():
    rows = [_row("unpatched"), _row("sinkhorn:eps=0.1 keep_rate=0.5 fitted"), _row("tome r=16")]
    lines = format_rows(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    start = lines[0].index("images_per_s")
    assert [float(line[start : start + len("images_per_s")]) for line in lines[1:]] == [12.5] * 3
    # rows printed one at a time (as benchmark() does) line up when given the run's widest label
    width = max(len(r.config) for r in rows)
    single = [format_rows([r], header=False, label_width=width) for r in rows]
    assert [len(s) for s in single] == [len(lines[1])] * 3
    assert single[1] == lines[2]
