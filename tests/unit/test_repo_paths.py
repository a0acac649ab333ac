"""The repository is self-contained: no file refers to a path outside it (a clone has nothing beside it)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = {".py", ".md", ".toml", ".ipynb", ".yml", ".yaml", ".sh", ".cfg", ".txt", ".json", ""}
# a relative path that climbs (../x), or a name this project's machines put beside a checkout
OUTSIDE = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-][\w./-]*|\bshared/ARCHITECTURE\.md|/work/\w")


def _repo_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / p for p in out.splitlines() if (ROOT / p).suffix in TEXT and (ROOT / p).is_file()]


def outside_references(path: Path, text: str) -> list[str]:
    """The references in ``text`` (the content of ``path``) that leave the repository or point nowhere in it."""
    found = []
    for m in OUTSIDE.finditer(text):
        ref = m.group(0).rstrip(".")
        if ref.startswith("../"):
            target = (path.parent / ref).resolve()
            if target.is_relative_to(ROOT) and target.exists():
                continue  # e.g. docs/x.md linking ../README.md
        found.append(ref)
    return found


def test_no_file_refers_outside_the_repository():
    offenders = {}
    for path in _repo_files():
        refs = outside_references(path, path.read_text(errors="replace"))
        if refs and path != Path(__file__).resolve():
            offenders[str(path.relative_to(ROOT))] = refs
    assert offenders == {}


def test_outside_references_are_found():
    readme = ROOT / "README.md"
    assert outside_references(readme, "see `../shared/ARCHITECTURE.md`") == ["../shared/ARCHITECTURE.md"]
    assert outside_references(ROOT / "docs" / "x.md", "[readme](../README.md)") == []
    assert outside_references(readme, "[gone](../missing.md) and /work/notes") == ["../missing.md", "/work/n"]
