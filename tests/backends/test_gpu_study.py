"""The ``sdpa-gpu-vs-torch`` study: reported skipped without a GPU, complete with one."""

from __future__ import annotations

import math

import pytest

from refattn.backends import cupy_support as cs
from refattn.bench import studies


def _gpu_torch():
    if not cs.available():
        return False
    torch = pytest.importorskip("torch")
    return torch.cuda.is_available()


def test_study_is_registered_with_its_tracked_metrics():
    study = studies()["sdpa-gpu-vs-torch"]
    assert set(study.requires) == {"cupy", "torch"}
    assert len(study.metric_names) == 8       # 2 dtypes x causal or not x fwd, fwd+bwd


def test_study_reports_itself_skipped_without_a_gpu():
    if _gpu_torch():
        pytest.skip("a CUDA device is present: the study runs (next test)")
    result = studies()["sdpa-gpu-vs-torch"].run("quick")
    assert not result.rows and not result.metrics and not result.failures
    assert any(note.startswith("skipped:") for note in result.notes)


def test_study_measures_every_tracked_metric_on_a_gpu():
    if not _gpu_torch():
        pytest.skip("needs CuPy and PyTorch with a CUDA device")
    study = studies()["sdpa-gpu-vs-torch"]
    result = study.run("quick")
    assert set(result.metrics) == set(study.metric_names)
    assert all(math.isfinite(r) and r > 0 for r in result.metrics.values())
    assert not result.failures              # targets are judged at size "full" only
