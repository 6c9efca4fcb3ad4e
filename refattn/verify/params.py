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
           "optional", "component", "hamilton_kernel", "head_block", "ZERO", "MHA_PARAMS",
           "identity_map", "resolve_map", "gather_gradients", "asahi_quaternion_params",
           "tay_hamilton_params", "pay_better_attention_params"]


@dataclass(frozen=True)
class Converter:
    """A rearrangement between refattn parameters ``names`` and one candidate array.

    Attributes
    ----------
    names : tuple of str
        The refattn parameters this candidate array holds.
    kind : {"same", "transpose", "concat", "packed_transpose", "column_concat", "zero", \
            "component", "hamilton_kernel", "head_block", "head_block_transpose"}
        ``same``: identical array.  ``transpose``: ``W.T`` (``torch.nn.Linear``
        weight ``(d_out, d_in)``).  ``concat``: refattn arrays concatenated along
        axis 0 (``in_proj_bias``).  ``packed_transpose``: transposes concatenated
        along axis 0 (``in_proj_weight``).  ``column_concat``: arrays concatenated
        along axis 1 (a fused ``(d_in, 3 d)`` weight such as GPT-2's ``c_attn``).
        ``zero``: a candidate parameter refattn's layer does not have, held at
        zero, its gradient dropped (:func:`optional`).  ``component``: ``W[index]``
        of a quaternion weight ``(4, n_in, n_out)`` (:func:`component`).
        ``hamilton_kernel``: ``[W_r | -W_i | -W_j | -W_k]`` (:func:`hamilton_kernel`).
        ``head_block`` / ``head_block_transpose``: block ``index`` of ``count`` along
        the last axis, transposed for the second (:func:`head_block`).
    optional : bool
        When refattn's layer has none of ``names``, the candidate parameter is
        held at zero instead of being an error (:func:`optional`).
    """

    names: tuple
    kind: str
    optional: bool = False
    index: int = 0
    count: int = 1

    @property
    def partial(self) -> bool:
        """Whether the candidate array holds one block of refattn's (``count`` blocks in all)."""
        return self.kind in _PARTIAL

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
        if self.kind == "component":
            return arrays[0][self.index]
        if self.kind == "hamilton_kernel":
            w = arrays[0]
            return np.concatenate([w[0], -w[1], -w[2], -w[3]], axis=-1)
        if self.kind in ("head_block", "head_block_transpose"):
            block = np.split(arrays[0], self.count, axis=-1)[self.index]
            return block.T if self.kind == "head_block_transpose" else block
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
        if self.kind == "hamilton_kernel":         # a signed permutation: its own adjoint's inverse
            r, i, j, k = np.split(array, 4, axis=-1)
            return {self.names[0]: np.stack([r, -i, -j, -k])}
        if self.kind == "component":
            return {self.names[0]: array}
        if self.kind in ("head_block", "head_block_transpose"):
            return {self.names[0]: array.T if self.kind == "head_block_transpose" else array}
        parts = np.split(array, len(self.names), axis=0)                # equal blocks along axis 0
        if self.kind == "concat":
            return dict(zip(self.names, parts))
        return {n: p.T for n, p in zip(self.names, parts)}              # packed_transpose

    def place(self, block, shape) -> np.ndarray:
        """The gradient of a :attr:`partial` converter's block as a full ``shape`` array."""
        full = np.zeros(shape, dtype=np.asarray(block).dtype)
        if self.kind == "component":
            full[self.index] = block
        else:
            width = shape[-1] // self.count
            full[..., self.index * width:(self.index + 1) * width] = block
        return full

    def shape_for(self, shapes: dict) -> tuple:
        """The candidate array's shape given refattn's ``{name: shape}``."""
        s = [tuple(shapes[n]) for n in self.names]
        if self.kind == "component":
            return s[0][1:]
        if self.kind == "hamilton_kernel":
            return (s[0][1], 4 * s[0][2])
        if self.kind in ("head_block", "head_block_transpose"):
            block = s[0][:-1] + (s[0][-1] // self.count,)
            return block[::-1] if self.kind == "head_block_transpose" else block
        if self.kind == "same":
            return s[0]
        if self.kind == "transpose":
            return s[0][::-1]
        if self.kind == "concat":
            return (sum(x[0] for x in s),) + s[0][1:]
        if self.kind == "column_concat":
            return (s[0][0], sum(x[1] for x in s))
        return (sum(x[-1] for x in s),) + s[0][:1]                      # packed_transpose (2-D)


#: Converter kinds whose candidate array is one block of a refattn parameter.
_PARTIAL = ("component", "head_block", "head_block_transpose")


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


def component(name: str, index: int) -> Converter:
    """Component ``index`` (0 = r, 1 = i, 2 = j, 3 = k) of a quaternion weight ``(4, n_in, n_out)``.

    Parcollet's ``QuaternionLinear`` (the official shared-score code's) stores
    ``r_weight, i_weight, j_weight, k_weight`` of shape ``(n_in, n_out)`` and builds
    the same block matrix as :func:`refattn.quaternion_linear`, so ``r_weight =
    w[0]``, ... (four entries cover one refattn weight).
    """
    return Converter((name,), "component", index=int(index), count=4)


def hamilton_kernel(name: str) -> Converter:
    """Tay et al.'s quaternion kernel ``(n_in, 4 n_out) = [W_r | -W_i | -W_j | -W_k]``.

    Their ``make_quarternion_mul`` builds the block rows ``[r, -i, -j, -k]``,
    ``[i, r, -k, j]``, ``[j, k, r, -i]``, ``[k, -j, i, r]`` (the transposed signs of
    refattn's :func:`~refattn.projections.quaternion.linear_matrix`), which is
    refattn's layer with the weights ``(W_r, -W_i, -W_j, -W_k)``.  A signed
    permutation, so gradients convert with the same rule.
    """
    return Converter((name,), "hamilton_kernel")


def head_block(name: str, head: int, n_heads: int, *, transpose: bool = True) -> Converter:
    """Head ``head``'s block of ``n_heads`` equal blocks along the last axis of ``name``.

    For modules with one ``nn.Linear(d_model, d_k)`` per head: its weight
    ``(d_k, d_model)`` is ``W[:, h d_k:(h+1) d_k].T`` (``transpose=True``), its bias
    ``b[h d_k:(h+1) d_k]`` (``transpose=False``).  ``n_heads`` entries cover one
    refattn parameter; the gradients are placed back into their blocks.
    """
    kind = "head_block_transpose" if transpose else "head_block"
    return Converter((name,), kind, index=int(head), count=int(n_heads))


#: The converter a resolved map holds for an absent optional parameter; in a map, a
#: candidate parameter refattn's layer never has (held at zero, its gradient dropped).
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
                            f"(same, linear_weight, concat, packed_linear, ...), got "
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
    covered = [n for conv in resolved.values() if not conv.partial for n in conv.names]
    blocks: dict = {}                                   # name -> [(index, count), ...]
    for conv in resolved.values():
        if conv.partial:
            blocks.setdefault(conv.names[0], []).append((conv.index, conv.count))
    twice = {n for n in covered if covered.count(n) > 1} | {n for n in blocks if n in covered}
    for n, parts in blocks.items():
        counts = {c for _, c in parts}
        if len(parts) != len(set(parts)) or len(counts) > 1:
            twice.add(n)
        elif sorted(i for i, _ in parts) == list(range(counts.pop())):
            covered.append(n)
    missing = [n for n in refattn_names if n not in covered and n not in twice]
    if twice or missing:
        raise ValueError(f"the parameter map must cover every refattn parameter exactly once; "
                         f"missing {missing}, mapped twice {sorted(twice)}")
    return resolved


def gather_gradients(mapping: dict, grads, shapes: dict) -> dict:
    """refattn's ``{name: gradient}`` from the candidate's gradients, one per map entry.

    ``grads`` are in the order of ``mapping``; ``shapes`` are refattn's parameter
    shapes.  Blocks of :attr:`Converter.partial` converters are placed into their
    parameter (the other entries of a block are zero) and summed.
    """
    out: dict = {}
    for conv, g in zip(mapping.values(), grads):
        for name, value in conv.to_refattn(g).items():
            if conv.partial:
                value = conv.place(value, tuple(shapes[name]))
            out[name] = value if name not in out else out[name] + value
    return out


def asahi_quaternion_params(bias: bool = True) -> dict:
    """The official shared-score ``QuaternionMultiHeadAttention`` against refattn's quaternion layer.

    Its ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` are Parcollet's
    ``QuaternionLinear`` (``r_weight ... k_weight (n, n)``, ``bias (d,)``); verify it
    against the ``head_layout="chunks"`` variants (``"qattn-shared-chunks"``) with
    ``empty_rows="uniform"`` (its ``finfo.min`` fill).
    """
    mapping = {}
    for mod, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
        for c, part in enumerate("rijk"):
            mapping[f"{mod}.{part}_weight"] = component(f"w_{name}", c)
        if bias:
            mapping[f"{mod}.bias"] = same(f"b_{name}")
    return mapping


def tay_hamilton_params(prefix: str = "") -> dict:
    """Tay et al.'s Hamilton projections (``kernel (n, 4 n)`` each, no bias): ``q, k, v, o``.

    The candidate's parameters are named ``{prefix}{q,k,v,o}.kernel`` (rename to
    your module's).  Verify against the ``head_layout="chunks"`` Hamilton variant
    (``"qattn-hamilton-chunks"``): their heads are contiguous chunks of the flat vector.
    """
    return {f"{prefix}{n}.kernel": hamilton_kernel(f"w_{n}") for n in "qkvo"}


def pay_better_attention_params(kind: str, n_heads: int) -> dict:
    """NMesaC's Optimised / Efficient / Super ``MultiHeadAttention`` against refattn's layer.

    One ``AttentionLayer`` per head (``layers.Attention_Layer h``) with its own
    ``W_q`` (and ``W_k`` for Optimised) ``nn.Linear(d_model, d_k)``, always biased;
    ``W_o = nn.Linear(H d_v, d_model)``; Super's shared ``W_a = nn.Linear(max_len,
    max_len)`` (``V = W_a.weight X + W_a.bias``) is refattn's ``w_a``, and its bias,
    which refattn's ``w_a`` does not have, is held at zero.  ``kind`` is one of
    ``"optimised"``, ``"efficient"``, ``"super"`` (refattn's projection names).
    """
    if kind not in ("optimised", "efficient", "super"):
        raise ValueError(f"kind must be 'optimised', 'efficient' or 'super', got {kind!r}")
    mapping = {}
    for h in range(n_heads):
        head = f"layers.Attention_Layer {h}"
        for n in ("q", "k") if kind == "optimised" else ("q",):
            mapping[f"{head}.W_{n}.weight"] = head_block(f"w_{n}", h, n_heads)
            mapping[f"{head}.W_{n}.bias"] = optional(head_block(f"b_{n}", h, n_heads,
                                                                transpose=False))
    mapping["W_o.weight"] = linear_weight("w_o")
    mapping["W_o.bias"] = optional(same("b_o"))
    if kind == "super":                 # shared by every head: PyTorch names it after head 0
        mapping["layers.Attention_Layer 0.W_a.weight"] = same("w_a")
        mapping["layers.Attention_Layer 0.W_a.bias"] = ZERO
    return mapping
