"""Cases (:class:`~refattn.catalog.Case`) from your own arrays, and the layer variants' test set.

A case is one problem of a refattn function or layer, with its inputs and
options: :func:`layer_case` and :func:`core_case` build one from your own
arrays, for ``refattn.verify.verify(..., cases=[...])``, golden files or
``refattn.testing``.  :func:`layer_test_cases` is the seeded set every layer
variant tests (``refattn.get_variant("mha-standard").cases()``, made in
:mod:`refattn.catalog.layers`), built so that
a masking or causality bug cannot pass:

* masked **self**-attention with an ``(L, S)`` mask and with a key-padding mask
  ``(B, 1, 1, S)`` (a ``(B, S)`` padding mask per sequence), not only masked
  cross-attention (a self-attention-only module would skip that one);
* causal attention alone, with a mask, and with key padding;
* grouped-query attention where the projection scheme allows it (``kv_heads``);
* the cases with a query row that keeps no key are separate, and their names
  end in ``"(empty rows)"``: conventions differ there (refattn and PyTorch's
  SDPA give 0, an additive ``finfo.min`` mask the mean of the values), so a
  candidate may report them not expressible without hiding anything else.

Examples
--------
>>> import numpy as np, refattn
>>> from refattn.catalog import layer_case
>>> layer = refattn.Attention(8, 2, causal=True)
>>> x = np.random.default_rng(0).standard_normal((2, 4, 8))
>>> padding = np.array([[True] * 4, [True, True, True, False]])     # (B, S), True = token
>>> case = layer_case(layer, x, key_padding=padding, name="my padded batch")
>>> case.name, case.options["mask"].shape
('my padded batch', (2, 1, 1, 4))
>>> case.run().shape
(2, 4, 8)
"""

from __future__ import annotations

import numpy as np

from .._validate import check_bool_array, check_float_array
from .case import Case

__all__ = ["layer_case", "core_case", "layer_test_cases", "EMPTY_ROWS"]

#: The suffix of every test case with a query row that keeps no key.
EMPTY_ROWS = "(empty rows)"


def layer_case(layer, xq, xkv=None, *, params=None, mask=None, key_padding=None, name=None,
               seed=0):
    """A :class:`Case` of a refattn layer on your inputs.

    Parameters
    ----------
    layer : refattn.Attention
        The reference configuration (projection, core, causal, bias, rotary, ...).
    xq : float array (*batch, L, d_model)
    xkv : float array (*batch, S, d_model), optional
        Cross-attention keys and values; None for self-attention.
    params : dict, optional
        The layer's parameters; default ``layer.init(seed)`` in the inputs' dtype.
    mask : bool array broadcastable to (*batch, H, L, S), optional
        Keep-mask, ``True`` = attend (:mod:`refattn.masks` converts the
        frameworks' masks).
    key_padding : bool array (B, S), optional
        ``True`` = a real token, ``False`` = padding (one batch axis).  Combined
        with ``mask`` by AND into a ``(B, 1, 1, S)`` keep-mask.
    name : str, optional
        Shown in reports; default a description of the case.
    seed : int
        Seeds the default parameters.
    """
    if not hasattr(layer, "config") or not hasattr(layer, "init"):
        raise TypeError(f"layer must be a refattn.Attention, got {type(layer).__name__}")
    check_float_array(xq, "xq")
    if xkv is not None:
        check_float_array(xkv, "xkv")
    if key_padding is not None:
        check_bool_array(key_padding, "key_padding", hint=" (True = token, False = padding)")
        S = (xq if xkv is None else xkv).shape[-2]
        if key_padding.ndim != 2 or key_padding.shape[-1] != S:
            raise ValueError(f"key_padding must have shape (B, S={S}), got "
                             f"{tuple(key_padding.shape)}")
        padding = key_padding[:, None, None, :]
        mask = padding if mask is None else np.logical_and(mask, padding)
    if mask is not None:
        check_bool_array(mask, "mask", hint=" (True = attend)")
    params = layer.init(seed=seed, dtype=xq.dtype) if params is None else params
    arrays = (params, xq) if xkv is None else (params, xq, xkv)
    if name is None:
        name = ("self" if xkv is None else "cross") + (", masked" if mask is not None else "")
    L = xq.shape[-2]
    S = L if xkv is None else xkv.shape[-2]
    batch = int(np.prod(xq.shape[:-2]))
    return Case(name, layer, arrays, {} if mask is None else {"mask": mask},
                batch * layer.flops(L, S))


def core_case(fn, *arrays, name="case", **options):
    """A :class:`Case` of a refattn function (``refattn.sdpa``, ...) on your arrays and options.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    >>> case = refattn.catalog.core_case(refattn.sdpa, q, k, v, causal=True, name="causal")
    >>> case.run().shape
    (1, 2, 3, 4)
    """
    if getattr(fn, "__refattn_vjp__", None) is None:
        raise TypeError(f"fn must be a refattn function with a backward pass (refattn.sdpa, ...), "
                        f"got {getattr(fn, '__name__', type(fn).__name__)}")
    return Case(name, fn, tuple(arrays), dict(options))


def layer_test_cases(make_layer, rng, dtype, sizes, *, key_mask=False, gqa=False, rotary=False):
    """The seeded ``"test"`` cases of a layer variant (see the module doc).

    Parameters
    ----------
    make_layer : callable
        ``make_layer(d_model, n_heads, **extra) -> Attention`` (the variant's layer).
    rng : numpy.random.Generator
    dtype : numpy dtype
    sizes : (batch, L, d_model, n_heads)
    key_mask : bool
        The core honours only masks on keys: every mask is a key-padding mask.
    gqa : bool
        The scheme takes ``kv_heads``: add a grouped-query case.
    rotary : bool
        The variant applies rotary embeddings: add cases for the other
        convention, a partial rotary dimension and another base.
    """
    b, L, d, h = sizes
    S = L + 2

    def case(label, S_=None, mask=None, **extra):
        layer = make_layer(d, h, **extra)
        params = layer.init(seed=int(rng.integers(1 << 31)), dtype=dtype)
        xq = rng.standard_normal((b, L, d)).astype(dtype)
        xkv = None if S_ is None else rng.standard_normal((b, S_, d)).astype(dtype)
        return layer_case(layer, xq, xkv, params=params, mask=mask, name=label)

    def padding(S_, empty=False):
        """(B, 1, 1, S): sequence i has its last i + 1 keys padded; key 0 is always kept."""
        keep = np.ones((b, 1, 1, S_), dtype=bool)
        for i in range(b):
            keep[i, ..., S_ - 1 - i:] = False
        if empty:
            keep[-1] = False                               # a sequence that is all padding
        return keep

    def general(rows, cols, empty_row=None):
        """(rows, cols) with ~30% masked, key 0 kept (no empty row) unless ``empty_row``."""
        m = rng.random((rows, cols)) > 0.3
        m[:, 0] = True
        if empty_row is not None:
            m[empty_row] = False
        return m

    def query_mask(rows, cols, empty_row=None):
        if key_mask:                                       # the core honours key masks only
            return padding(cols, empty=empty_row is not None)
        return general(rows, cols, empty_row)

    kind = "key padding (B, S)" if key_mask else "mask (L, S)"
    cases = [
        case("self"),
        case("self causal, bias", causal=True, bias=True),
        case(f"cross S=L+2, {kind}", S_=S, mask=query_mask(L, S)),
        case(f"self, {kind}", mask=query_mask(L, L)),
        case("self, key padding (B, S), bias", mask=padding(L), bias=True),
        case(f"self causal, {kind}", mask=query_mask(L, L), causal=True),
    ]
    if gqa and h > 1:
        cases.append(case(f"self causal GQA {h}/1, key padding (B, S)", mask=padding(L),
                          causal=True, kv_heads=1))
    if rotary:
        cases += [
            case("self causal, interleaved rotary", causal=True, rotary="interleaved"),
            case("self, partial rotary (half the head), base 100, key padding (B, S)",
                 mask=padding(L), rotary_dim=max(2, (d // h) // 2), rotary_base=100.0),
        ]
    cases += [
        case(f"cross S=L+2, {kind} {EMPTY_ROWS}", S_=S, mask=query_mask(L, S, empty_row=1)),
        case(f"self, key padding (B, S) {EMPTY_ROWS}", mask=padding(L, empty=True)),
    ]
    return cases
