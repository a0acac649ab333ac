"""One validation helper (tokvis.validate) across the library: no private copies, one behaviour."""

from __future__ import annotations

import ast
from pathlib import Path

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
