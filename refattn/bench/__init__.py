"""Performance studies: side-by-side measurements reported as ratios.

A :class:`Study` measures something that a single time cannot say (a scheme
against standard attention, shared against Hamilton quaternion attention,
numba against PyTorch, the scaling exponent of a linear-time form).  Studies
run inside one process, interleaving their contenders, so the ratios hold on
a noisy machine.  ``refattn`` (the main report) runs every study at
``size="quick"``; ``refattn bench`` runs them at ``size="full"``; the asv suite
tracks their ``metrics``.

:data:`STUDIES` is the explicit inventory: a new study is a module here and one
line below.
"""

from __future__ import annotations

from . import (dask_scaling, elementwise_scaling, numba_studies, preconditioned_overhead,
               projection_schemes, quaternion_cores, sdpa_gpu, sdpa_options, sdpa_varlen,
               training)
from .study import Study, StudyResult
from .timing import compare, time_call

__all__ = ["Study", "StudyResult", "STUDIES", "studies", "compare", "time_call"]

#: Every study, by name, in the order the report runs them.
STUDIES = {study.name: study for study in (
    projection_schemes.STUDY,
    quaternion_cores.STUDY,
    elementwise_scaling.STUDY,
    preconditioned_overhead.STUDY,
    *numba_studies.STUDIES,
    sdpa_options.STUDY,
    sdpa_varlen.STUDY,
    sdpa_gpu.STUDY,
    dask_scaling.STUDY,
    training.STUDY,
)}


def studies() -> dict:
    """``{name: Study}`` of every study (a copy of :data:`STUDIES`)."""
    return dict(STUDIES)
