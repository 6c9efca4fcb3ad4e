"""Standard scaled dot-product attention (Vaswani et al. 2017; ``docs/cores/sdpa.md``).

``api.py`` (front end and backend contract), ``reference.py`` (array API),
``numba.py`` (CPU kernels) and ``cupy.py`` (CUDA kernels in ``sdpa.cu``) side by side;
``numba_mods.py`` and ``cuda_mods.py`` bring FlexAttention-style functions into the numba and
CUDA kernels.
"""

from __future__ import annotations

from ..._core import Core
from .api import IMPLEMENTED, backward, flops, forward, sdpa

__all__ = ["sdpa", "forward", "backward", "CORE"]

CORE = Core(
    name="sdpa",
    forward=forward,
    backward=backward,
    layout="real",
    backends=IMPLEMENTED,
    options=("scale", "dropout_mask", "dropout_p", "causal_align", "bias", "window", "softcap",
             "alibi_slopes", "empty_rows", "query_seq_lengths", "key_value_seq_lengths",
             "mask_mod", "score_mod", "score_mod_grad"),
    flops=flops,
    summary="softmax(scale q k^T + bias) v, FlashAttention-2 backward",
    call_options=("cu_seqlens_q", "cu_seqlens_k"),
)
