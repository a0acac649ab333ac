"""The command line prints tokvis's warnings as one line each, and not the deprecation notices of dependencies."""

from __future__ import annotations

import warnings

from tokvis.cli import _hide_dependency_deprecations


def _shown(category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hide_dependency_deprecations()
        warnings.warn_explicit("a notice", category, filename=f"{module}.py", lineno=1, module=module)
    return bool(caught)


def test_a_dependency_deprecation_is_hidden():
    assert not _shown(FutureWarning, "timm.models.hrnet")
    assert not _shown(DeprecationWarning, "torch.jit._script")
    assert not _shown(PendingDeprecationWarning, "tokvisextra")  # another package whose name starts alike


def test_tokvis_warnings_and_other_categories_are_shown():
    assert _shown(FutureWarning, "tokvis.methods.vomix")
    assert _shown(DeprecationWarning, "tokvis")
    assert _shown(UserWarning, "timm.models.hrnet")
    assert _shown(RuntimeWarning, "numpy.core")
