"""tokvis flops: tokvis's GMACs reproduce the published figures (tokvis/assets/published_flops.json), offline."""

from __future__ import annotations

import os

import pytest

import tokvis
from tokvis.bench import FLOPS_TOLERANCE, flops_table, published_flops
from tokvis.cli import main


def test_every_row_cites_a_source_and_names_a_known_setting():
    data = published_flops()
    labels = [r["label"] for r in data["rows"]]
    assert len(labels) == len(set(labels))
    for r in data["rows"]:
        assert r["source"] in data["sources"], r["label"]
        assert r["method"] is None or r["method"] in tokvis.list_methods(), r["label"]
        assert (r["gmacs"] is None) == (r["digits"] is None), r["label"]
        if r["gmacs"] is not None:
            assert r["gmacs"] > 0


def _check(rows):
    assert rows
    for row in rows:
        if row.published is None:
            assert row.note.startswith("no published figure"), row
            continue
        assert row.agrees, row
        if abs(row.rel_diff) > FLOPS_TOLERANCE:  # beyond 2 %: only within the figure's rounding, and said so
            assert "published to 1 decimal" in row.note, row


def test_published_flops_reproduced_deit_tiny():
    """The DeiT-T rows (a few seconds); every row in the slow test below."""
    rows = [r["label"] for r in published_flops()["rows"] if r["model"] == "deit_tiny_patch16_224"]
    assert len(rows) >= 5
    _check(flops_table(rows))


@pytest.mark.slow
def test_published_flops_reproduced_every_row():
    """Every row, DeiT-B and ViT-L included (about a minute on an idle CPU)."""
    _check(flops_table())


def test_cli_prints_the_row_beside_its_figure_and_source(capsys):
    assert main(["flops", "--rows", "DeiT-T", "DynamicViT DeiT-S rho=0.7"]) == 0
    out = capsys.readouterr().out
    assert "tokvis GMACs" in out and "published GMACs" in out
    deit = next(line for line in out.splitlines() if line.startswith("DeiT-T"))
    assert "1.26" in deit and "mctf-readme" in deit
    dyn = next(line for line in out.splitlines() if line.startswith("DynamicViT"))
    assert "leaves out the score predictors" in dyn
    assert "mlvlab/MCTF README.md" in out  # the citation
    assert "2 of 2 published figures reproduced" in out


def test_cli_unknown_row_is_one_line_exit_2(capsys):
    assert main(["flops", "--rows", "DeiT-Z"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DeiT-Z" in err[0]


def test_bench_flops_prints_the_same_table(capsys, monkeypatch):
    import tokvis.bench

    real = tokvis.bench.flops_table
    asked = []

    def one_row(labels=None, **kw):  # the whole table is the slow test's; the command path is what is tested here
        asked.append(labels)
        return real(["DeiT-T"], **kw)

    monkeypatch.setattr(tokvis.bench, "flops_table", one_row)
    assert main(["bench", "--flops"]) == 0
    out = capsys.readouterr().out
    assert asked == [None]  # every row asked for
    assert out.splitlines()[0].split()[:3] == ["setting", "tokvis", "GMACs"]
    assert "1 of 1 published figures reproduced" in out


def test_cli_missing_tome_checkout_is_one_line_exit_2(capsys, tmp_path):
    assert main(["flops", "--rows", "DeiT-T", "--tome-repo", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ToMe checkout" in err[0] and "nowhere" in err[0]


def test_cli_unimportable_tome_checkout_is_an_error(capsys, tmp_path):
    assert main(["flops", "--rows", "DeiT-T", "--tome-repo", str(tmp_path)]) == 2  # a folder without `tome`
    assert "cannot import the official ToMe" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TOKVIS_TOME_REPO"), reason="needs TOKVIS_TOME_REPO (a ToMe clone)")
def test_tome_rows_equal_the_official_codes_count():
    """The off-the-shelf rows have no published figure: the official code's count on the same model decides."""
    labels = [r["label"] for r in published_flops()["rows"] if r["method"] == "tome"]
    rows = flops_table(labels, tome_repo=os.environ["TOKVIS_TOME_REPO"])
    assert len(rows) == len(labels) >= 9
    for row in rows:
        assert row.official is not None and row.official > 0, row
        assert abs(row.gmacs - row.official) <= FLOPS_TOLERANCE * row.official, row
        if row.published is None:
            assert row.agrees and "the official code counts" in row.note, row
