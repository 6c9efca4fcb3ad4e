"""Layer parameters mapped by name between refattn and a framework module.

refattn stores a linear map as ``y = x @ W + b`` with ``W (d_in, d_out)`` under
names such as ``w_q``, ``b_q``, ``w_o`` (see ``layer.param_shapes()``).  A
framework module names and lays out the same numbers its own way: a
``torch.nn.Linear`` weight is ``(d_out, d_in)``; ``torch.nn.MultiheadAttention``
packs the three input projections into one ``in_proj_weight (3 d, d)``.

A *parameter map* is a dict ``{candidate_name: converter}``.  Every converter is
a rearrangement (transpose, concatenation, identity), so one object serves both
directions:

* ``to_candidate(params)`` builds the candidate's array from refattn's
  parameters (used to load the same weights into the candidate);
* ``to_refattn(array)`` splits a candidate array back into refattn's names and
  layout.  Because the map is a rearrangement, the gradient of the candidate's
  parameter converts with the same function.

Examples
--------
>>> import numpy as np
>>> from refattn.verify import params as P
>>> w = {"w_q": np.eye(2), "w_k": 2 * np.eye(2), "w_v": 3 * np.eye(2)}
>>> packed = P.packed_linear("w_q", "w_k", "w_v").to_candidate(w)
>>> packed.shape                        # (3 d_out, d_in), as in_proj_weight
(6, 2)
>>> sorted(P.packed_linear("w_q", "w_k", "w_v").to_refattn(packed))
['w_k', 'w_q', 'w_v']

Fused weights stored ``(d_in, 3 d)`` (GPT-2's ``Conv1D`` ``c_attn``, ``y = x @ W``)
are column-concatenated; a bias a module always has, where refattn's layer has
none, is :func:`optional`: held at zero and its gradient dropped:

>>> P.column_concat("w_q", "w_k", "w_v").to_candidate(w).shape     # [W_q | W_k | W_v]
(2, 6)
>>> conv = P.optional(P.same("b_q"))
>>> sorted(P.resolve_map({"bias": conv}, [], ["bias"]))           # a bias=False case
['bias']
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Converter", "same", "linear_weight", "packed_linear", "concat", "column_concat",
           "optional", "ZERO", "MHA_PARAMS", "identity_map", "resolve_map"]


@dataclass(frozen=True)
class Converter:
    """A rearrangement between refattn parameters ``names`` and one candidate array.

    Attributes
    ----------
    names : tuple of str
        The refattn parameters this candidate array holds.
    kind : {"same", "transpose", "concat", "packed_transpose", "column_concat", "zero"}
        ``same``: identical array.  ``transpose``: ``W.T`` (``torch.nn.Linear``
        weight ``(d_out, d_in)``).  ``concat``: refattn arrays concatenated along
        axis 0 (``in_proj_bias``).  ``packed_transpose``: transposes concatenated
        along axis 0 (``in_proj_weight``).  ``column_concat``: arrays concatenated
        along axis 1 (a fused ``(d_in, 3 d)`` weight such as GPT-2's ``c_attn``).
        ``zero``: a candidate parameter refattn's layer does not have, held at
        zero, its gradient dropped (:func:`optional`).
    optional : bool
        When refattn's layer has none of ``names``, the candidate parameter is
        held at zero instead of being an error (:func:`optional`).
    """

    names: tuple
    kind: str
    optional: bool = False

    def to_candidate(self, params: dict, shape=None) -> np.ndarray:
        """The candidate's array, built from refattn's ``params`` (``zero``: of ``shape``)."""
        if self.kind == "zero":
            return np.zeros(shape)
        arrays = [np.asarray(params[n]) for n in self.names]
        if self.kind == "same":
            return arrays[0]
        if self.kind == "transpose":
            return arrays[0].T
        if self.kind == "concat":
            return np.concatenate(arrays, axis=0)
        if self.kind == "column_concat":
            return np.concatenate(arrays, axis=1)
        return np.concatenate([a.T for a in arrays], axis=0)           # packed_transpose

    def to_refattn(self, array) -> dict:
        """Split a candidate array (a value or its gradient) into refattn's ``{name: array}``."""
        array = np.asarray(array)
        if self.kind == "zero":
            return {}
        if self.kind == "same":
            return {self.names[0]: array}
        if self.kind == "transpose":
            return {self.names[0]: array.T}
        if self.kind == "column_concat":
            return dict(zip(self.names, np.split(array, len(self.names), axis=1)))
        parts = np.split(array, len(self.names), axis=0)                # equal blocks along axis 0
        if self.kind == "concat":
            return dict(zip(self.names, parts))
        return {n: p.T for n, p in zip(self.names, parts)}              # packed_transpose

    def shape_for(self, shapes: dict) -> tuple:
        """The candidate array's shape given refattn's ``{name: shape}``."""
        s = [tuple(shapes[n]) for n in self.names]
        if self.kind == "same":
            return s[0]
        if self.kind == "transpose":
            return s[0][::-1]
        if self.kind == "concat":
            return (sum(x[0] for x in s),) + s[0][1:]
        if self.kind == "column_concat":
            return (s[0][0], sum(x[1] for x in s))
        return (sum(x[-1] for x in s),) + s[0][:1]                      # packed_transpose (2-D)


def same(name: str) -> Converter:
    """The candidate array equals refattn's ``name`` (same layout)."""
    return Converter((name,), "same")


def linear_weight(name: str) -> Converter:
    """A ``torch.nn.Linear``-style weight ``(d_out, d_in)`` = refattn's ``W.T``."""
    return Converter((name,), "transpose")


def concat(*names: str) -> Converter:
    """refattn arrays concatenated along axis 0 (e.g. ``in_proj_bias = [b_q, b_k, b_v]``)."""
    return Converter(tuple(names), "concat")


def packed_linear(*names: str) -> Converter:
    """Linear weights packed like ``in_proj_weight = [W_q^T; W_k^T; W_v^T]`` (``(3 d, d)``)."""
    return Converter(tuple(names), "packed_transpose")


def column_concat(*names: str) -> Converter:
    """refattn weights side by side along axis 1: a fused ``(d_in, 3 d)`` ``[W_q | W_k | W_v]``.

    The layout of a map stored ``(in, out)`` (``y = x @ W``), as GPT-2's
    ``Conv1D`` ``c_attn``; the ``torch.nn.Linear`` layout ``(out, in)`` is
    :func:`packed_linear`.  The blocks must be equally wide.
    """
    return Converter(tuple(names), "column_concat")


def optional(converter: Converter) -> Converter:
    """``converter``, or a zero parameter when refattn's layer has none of its names.

    For a bias a module always has (``nn.Linear(bias=True)``, HF's ``Conv1D``)
    and a ``bias=False`` case: the candidate's bias is held at zero, which is the
    layer without it, and its gradient is dropped.
    """
    return replace(converter, optional=True)


#: The converter a resolved map holds for an absent optional parameter.
ZERO = Converter((), "zero")


#: ``torch.nn.MultiheadAttention`` (``batch_first`` irrelevant) against refattn's
#: standard projection.
MHA_PARAMS = {
    "in_proj_weight": packed_linear("w_q", "w_k", "w_v"),
    "in_proj_bias": concat("b_q", "b_k", "b_v"),
    "out_proj.weight": linear_weight("w_o"),
    "out_proj.bias": same("b_o"),
}


def identity_map(names) -> dict:
    """Candidate parameters named exactly like refattn's, in the same layout."""
    return {n: same(n) for n in names}


def resolve_map(mapping, refattn_names, candidate_names) -> dict:
    """Check a parameter map against both sides and drop entries neither side has.

    An entry whose candidate parameter is absent AND whose refattn parameters are
    all absent is dropped (a bias of a layer built with ``bias=False``).  Anything
    half-present, unmapped or mapped twice is a ``ValueError`` naming it.
    """
    refattn_names, candidate_names = list(refattn_names), list(candidate_names)
    if mapping is None:
        if sorted(candidate_names) != sorted(refattn_names):
            raise ValueError(f"the candidate's parameters {candidate_names} are not named like "
                             f"refattn's {refattn_names}; pass params={{candidate_name: "
                             f"converter}} built with refattn.verify.params")
        mapping = identity_map(refattn_names)
    resolved = {}
    for cname, conv in mapping.items():
        if not isinstance(conv, Converter):
            raise TypeError(f"params[{cname!r}] must be a converter from refattn.verify.params "
                            f"(same, linear_weight, concat, packed_linear), got "
                            f"{type(conv).__name__}")
        present = [n in refattn_names for n in conv.names]
        if cname not in candidate_names and not any(present):
            continue
        if conv.optional and not any(present):
            resolved[cname] = ZERO
            continue
        if cname not in candidate_names:
            raise ValueError(f"the parameter map names candidate parameter {cname!r}, which the "
                             f"candidate does not have (it has {candidate_names})")
        if not all(present):
            missing = [n for n, p in zip(conv.names, present) if not p]
            raise ValueError(f"candidate parameter {cname!r} maps to refattn parameter(s) "
                             f"{missing} that this layer does not have (it has {refattn_names})")
        resolved[cname] = conv
    unmapped = [c for c in candidate_names if c not in resolved]
    if unmapped:
        raise ValueError(f"candidate parameter(s) {unmapped} have no entry in the parameter map; "
                         f"map each to refattn's {refattn_names} with refattn.verify.params")
    covered = [n for conv in resolved.values() for n in conv.names]        # ZERO: none
    twice = sorted({n for n in covered if covered.count(n) > 1})
    missing = [n for n in refattn_names if n not in covered]
    if twice or missing:
        raise ValueError(f"the parameter map must cover every refattn parameter exactly once; "
                         f"missing {missing}, mapped twice {twice}")
    return resolved
