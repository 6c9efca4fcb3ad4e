"""Dtype-aware acceptance of a candidate's error, after PyTorch and FlashAttention.

Both projects test an attention kernel in low precision the same way: the
kernel's error against a high-precision reference must be at most a small
multiple of the error that a *plain reference implementation run in the same
low precision* makes against that reference, plus a floor at the rounding
level of the dtype.  FlashAttention's test suite (``tests/test_flash_attn.py``)
allows twice that error for the output and three times for ``dq, dk, dv``
(backward passes re-associate more sums); PyTorch's SDPA tests derive
``atol``/``rtol`` from the same low-precision reference with a fudge factor.

Errors are absolute maxima over a tensor, as in both projects, and the
candidate passes when::

    max|cand - ref64| <= factor * max|ref_dtype - ref64| + FLOOR_ULPS[dtype] * eps(dtype) * scale

where ``ref64`` is refattn's float64 reference on the candidate's (rounded)
inputs, ``ref_dtype`` the refattn reference in the candidate's dtype, and
``scale`` the magnitude of the quantity: ``max|ref64|``, or, for a quantity that
cancels to about zero in exact arithmetic (the gradient of a key bias, which a
softmax ignores), the magnitude of the terms it sums, which the reference's own
rounding error reveals (``max|ref32 - ref64| / eps(float32)``).  The table shows
errors divided by ``scale``.

The refattn reference runs in float32 and float64 only (NumPy has no
bfloat16, and float64 has no higher precision to compare with), so its error is
*measured* in float32 and *scaled* to the other dtypes by the ratio of machine
epsilons: first-order rounding-error analysis makes an algorithm's error
proportional to the unit roundoff (Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 3).  The floor covers what the scaling misses: a float32 run that
happens to be almost exact on a tiny problem, and the rounding of the output
itself to the dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OUTPUT_FACTOR", "GRADIENT_FACTOR", "FLOOR_ULPS", "DTYPES", "eps", "scale",
           "reference_error", "bound"]

#: FlashAttention's factors: outputs 2x, gradients 3x the low-precision reference's error.
OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0

#: The floor, in units of the dtype's machine epsilon times the quantity's scale.  It
#: covers what the reference-error term cannot: a candidate that evaluates the same
#: formula by an equivalent but differently rounded algorithm (re-associated sums, a
#: Horner polynomial instead of moments, a prefix scan instead of a direct sum) when the
#: reference happens to be nearly exact, and the final rounding of outputs to the dtype.
#: Measured on the registry's test cases with plain PyTorch implementations of every
#: variant (tests/verify/torch_models.py):
#:
#: * float64: 64 ulps (1.4e-14).  The reference's error is never measured there, only
#:   extrapolated from float32, and refattn's element-wise Taylor prefix scan and a
#:   direct sum differ by 8 ulps on a one-query causal case (where the sum is exact).
#: * float32: 16 ulps (1.9e-6).  Correct implementations reach 5.3 ulps (a Horner Taylor
#:   polynomial against refattn's moment form); 16 leaves a factor 3 for other BLAS or
#:   vectorisation orders.  PyTorch's own default float32 ``atol`` is looser (1e-5).
#: * float16, bfloat16: 4 ulps.  The extrapolated reference error already spans several
#:   ulps; the smallest margin measured is a factor 2 (bfloat16).  4 ulps keep the bound
#:   far below semantic bugs even in bfloat16 (3% of the scale, where a wrong scale, sign
#:   or mask moves results by 20% to 100%).
FLOOR_ULPS = {"float64": 64, "float32": 16, "float16": 4, "bfloat16": 4}

#: The dtypes a candidate can be verified in, lowest precision last.
DTYPES = ("float64", "float32", "float16", "bfloat16")


def eps(dtype: str) -> float:
    """Machine epsilon of ``dtype`` (bfloat16 has 8 significand bits)."""
    if dtype == "bfloat16":
        return 2.0 ** -7
    return float(np.finfo(np.dtype(dtype)).eps)


def scale(reference_magnitude: float, float32_error: float) -> float:
    """The magnitude errors are measured against (see the module doc)."""
    return max(reference_magnitude, float32_error / eps("float32"), np.finfo(np.float64).tiny)


def reference_error(float32_error: float, dtype: str) -> float:
    """The reference's error in ``dtype``, from its measured float32 error (see the module doc)."""
    return float32_error * eps(dtype) / eps("float32")


def bound(dtype: str, reference_err: float, quantity_scale: float, gradient: bool) -> float:
    """The largest absolute error accepted for one output (``gradient=False``) or gradient."""
    factor = GRADIENT_FACTOR if gradient else OUTPUT_FACTOR
    return factor * reference_err + FLOOR_ULPS[dtype] * eps(dtype) * quantity_scale
