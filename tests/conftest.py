"""Shared fixtures: the registry drives the parametrisation of the generic tests."""

from __future__ import annotations

import os

# The JAX adapter tests verify the adapters on the CPU, as CI runs them.  On a GPU
# machine JAX would otherwise preallocate 75% of the device memory in every test
# process (starving the CuPy tests) and run float32 matmuls in TF32, which
# refattn.verify rightly reports as float32 failures (see docs/verify.md).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import refattn
from refattn.backends import available_backends


def pytest_report_header(config):
    return f"refattn backends available: {', '.join(available_backends())}"


def variant_cases(kind="test"):
    """``(variant, case_index)`` params for every registered variant's test cases."""
    out = []
    for name, variant in sorted(refattn.variants().items()):
        for i, case in enumerate(variant.cases(kind, "float64")):
            out.append(pytest.param(name, i, id=f"{name}[{case.name}]"))
    return out


def kernel_backends():
    """Non-reference backends usable here."""
    return [b for b in available_backends() if b != "reference"]


def window_band(L, S, left, right, offset):
    """The (L, S) keep mask of ``window=(left, right)`` written from its definition
    (``offset - left <= j - i <= offset + right``; -1 unbounded), independent of refattn."""
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    keep = np.ones((L, S), bool)
    if left >= 0:
        keep &= j >= i + offset - left
    if right >= 0:
        keep &= j <= i + offset + right
    return keep
