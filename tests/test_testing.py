"""refattn.testing must catch what it is there to catch."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.testing import assert_close, check_grads, max_errors


def _wrong_backward(q, k, v, **options):
    o, pull = refattn.vjp(refattn.sdpa, q, k, v, **options)
    return o, lambda do: tuple(g * 1.001 if i == 1 else g for i, g in enumerate(pull(do)))


def _broken(q, k, v, **options):
    return refattn.sdpa(q, k, v, **options)


_broken.__refattn_vjp__ = _wrong_backward


def test_check_grads_catches_a_wrong_gradient():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    report = check_grads(_broken, q, k, v, raise_on_failure=False)
    assert not report.ok
    failing = {r[0] for r in report.rows if not r[5]}
    assert failing == {"input 1"}
    with pytest.raises(AssertionError, match="gradient check failed"):
        check_grads(_broken, q, k, v)


def test_check_grads_passes_a_right_gradient_and_reports():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    report = check_grads(refattn.sdpa, q, k, v, causal=True)
    assert report.ok and report.max_rel_error < 1e-6
    assert "GradCheckReport" in repr(report) and "input 2" in repr(report)


def test_assert_close_and_max_errors():
    a = np.array([1.0, 2.0, 3.0])
    assert max_errors(a, a) == (0.0, 0.0)
    assert_close(a * (1 + 1e-12), a, "float64")
    with pytest.raises(AssertionError, match="1 of 3 elements differ"):
        assert_close(a + np.array([0, 0, 1e-3]), a, "float64", what="x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(a[:2], a, "float64")
