"""One validation helper (tokvis.validate) across the library: no private copies, one behaviour."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

import tokvis
from tokvis.errors import MethodOptionError
from tokvis.methods import create_method

HELPERS = {"check_int", "check_float", "check_choice", "_check_choice", "_check_int", "_check_float"}


def test_no_private_copies_of_the_validation_helpers():
    root = Path(tokvis.__file__).parent
    copies = []
    for path in root.rglob("*.py"):
        if path.name == "validate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in HELPERS:
                copies.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert not copies, f"use tokvis.validate instead of: {copies}"


@pytest.mark.parametrize(
    "method,options",
    [
        ("dpcknn", {"k": np.int64(3), "seed": np.int32(1)}),
        ("kmedoids", {"iterations": np.int64(2)}),
        ("vomix", {"votes": np.int64(2), "tau": np.float32(0.5)}),
        ("sinkhorn", {"iters": np.int64(3), "eps": np.float64(0.1)}),
        ("mctf", {"tau_sim": np.float32(1.0)}),
    ],
)
def test_numpy_scalars_are_accepted_as_options(method, options):
    # options read from arrays / configs arrive as numpy scalars; they are ints and floats
    opts = create_method(method, **options).options()
    for key, value in options.items():
        if key in opts:
            assert opts[key] == pytest.approx(float(value))


@pytest.mark.parametrize(
    "method,options,name",
    [
        ("dpcknn", {"k": True}, "k"),
        ("dpcknn", {"seed": 1.5}, "seed"),
        ("dpcknn", {"placement": "before"}, "placement"),
        ("kmedoids", {"iterations": 0}, "iterations"),
        ("vomix", {"votes": 2.0}, "votes"),
        ("vomix", {"tau": float("nan")}, "tau"),
        ("vomix", {"tau": float("inf")}, "tau"),
        ("mctf", {"tau_info": -1}, "tau_info"),
        ("sinkhorn", {"eps": float("nan")}, "eps"),
        ("sinkhorn", {"iters": False}, "iters"),
        ("sit", {"hidden_ratio": 0}, "hidden_ratio"),
        ("dynamicvit", {"tau": "1"}, "tau"),
        ("topk", {"score": "max"}, "score"),
        ("tome", {"prop_attn": "yes"}, "prop_attn"),
        ("radial", {"norm": "l3"}, "norm"),
    ],
)
def test_bad_method_options_name_the_option(method, options, name):
    with pytest.raises(MethodOptionError, match=rf"^{name}\b.* must be .*: got "):
        create_method(method, **options)


def _sample(a, *, n: int = 1, x: float | None = None, names: Sequence[str] | None = None,
            weights: Mapping[str, float] | None = None, ax: Any = None, flag: bool = False):  # fmt: skip
    """A function checked by its annotations.

    Parameters
    ----------
    a, n, x, names, weights, ax, flag
        Anything.
    """
    return n


def test_checked_keywords_checks_each_given_argument_against_its_annotation():
    from tokvis.errors import ArgumentTypeError, ArgumentValueError
    from tokvis.validate import checked_keywords

    f = checked_keywords(n={"minimum": 1}, x={"low": 0.0})(_sample)
    assert f(None, n=np.int64(3), x=0.5, names=("a", "b"), weights={"a": 1.0}, ax=object(), flag=np.bool_(True)) == 3
    assert f(None, names=np.array(["a"])) == 1  # an array is a sequence
    for kw, error, words in [
        ({"n": "2"}, ArgumentTypeError, "n must be an integer: got str '2'"),
        ({"n": True}, ArgumentTypeError, "n must be an integer"),
        ({"n": 0}, ArgumentValueError, "n must be an integer >= 1"),
        ({"x": float("nan")}, ArgumentValueError, "x must be a number"),
        ({"x": -1.0}, ArgumentValueError, "x must be a number in [0, inf]"),
        ({"names": "ab"}, ArgumentTypeError, "names must be a list of strings or None"),
        ({"names": ["a", 1]}, ArgumentTypeError, "a list of strings"),
        ({"weights": {"a": "high"}}, ArgumentTypeError, "a mapping of name -> a number or None"),
        ({"flag": "false"}, ArgumentTypeError, "flag must be True or False"),
        ({"nmes": ["a"]}, ArgumentTypeError, "did you mean 'names'?"),
    ]:
        with pytest.raises(error) as e:
            f(None, **kw)
        assert words in str(e.value), (kw, str(e.value))
    with pytest.raises(ArgumentTypeError, match="missing a required argument"):
        f()
    # NaN only where a rule allows it; a callable rule replaces the annotation's check
    assert checked_keywords(x={"nan": True})(_sample)(None, x=float("nan")) == 1
    seen = []
    assert checked_keywords(n=lambda name, v: seen.append((name, v)))(_sample)(None, n="any") == "any"
    assert seen == [("n", "any")]
    with pytest.raises(TypeError, match="no parameter"):
        checked_keywords(m={"minimum": 0})(_sample)


def test_legend_locations_are_the_ones_matplotlib_accepts():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokvis.errors import ArgumentValueError
    from tokvis.validate import check_colormap, check_legend_location, legend_locations

    locs = legend_locations()
    assert "best" in locs and "outside right upper" in locs
    for loc in locs:  # matplotlib itself is the other path: every location is drawn
        fig, ax = plt.subplots(layout="constrained")
        ax.plot([0, 1], label="a")
        (fig if loc.startswith("outside") else ax).legend(loc=loc)
        fig.canvas.draw()
        plt.close(fig)
    with pytest.raises(ValueError):  # and refuses what the check refuses
        plt.figure().legend(handles=[plt.Line2D([], [], label="a")], loc="outside middle")
    plt.close("all")
    with pytest.raises(ArgumentValueError, match="did you mean 'upper left'"):
        check_legend_location("loc", "uper left")
    with pytest.raises(ArgumentValueError, match="did you mean 'viridis'"):
        check_colormap("cmap", "viridiss")
    assert check_colormap("cmap", plt.get_cmap("magma")).name == "magma"
