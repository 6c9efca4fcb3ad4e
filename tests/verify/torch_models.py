"""Plain PyTorch implementations of every variant, written from docs/variants.md, with planted bugs.

These are the "user code" the verify tests check: each function or module is a
straightforward PyTorch transcription of the spec; ``bug=`` plants one of the
classic mistakes:

``"scale"``          1/E instead of 1/sqrt(E) (quaternion: 1/sqrt(d) instead of 1/sqrt(4d);
                     element-wise: exp(q k) instead of exp(2 q k) in the Taylor form)
``"softmax_axis"``   normalise over queries instead of keys
``"causal_leak"``    the causal mask lets query i see key i + 1 (Super: W_A not restricted
                     to its lower triangle)
``"hamilton_sign"``  one sign of the Hamilton product flipped
"""

from __future__ import annotations

import functools
import math

import pytest

from refattn.verify import params as P
from refattn.verify.adapters import Unsupported, accepts

torch = pytest.importorskip("torch")
nn = torch.nn

BUGS = ("scale", "softmax_axis", "causal_leak", "hamilton_sign")


def keep_mask(mask, causal, causal_align, L, S, device=None, bug=None):
    """Boolean keep-mask broadcastable to the scores (None when every key is kept)."""
    keep = mask
    if causal:
        offset = 0 if causal_align == "upper_left" else S - L
        if bug == "causal_leak":
            offset += 1
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        keep = (j <= i + offset) if keep is None else keep & (j <= i + offset)
    return keep


def masked_softmax(scores, keep, dim=-1):
    """Softmax over ``dim`` where ``keep``; a row with no key left gives 0 (and no NaN gradient)."""
    if keep is None:
        return torch.softmax(scores, dim=dim)
    keep = torch.broadcast_to(keep, scores.shape)
    # The dtype's minimum instead of -inf keeps a fully masked row finite; multiplying by
    # keep then zeroes it (a row with a kept key gets exp(min - max) = 0 anyway).
    p = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=dim)
    return p * keep


def _repeat_kv(x, heads, head_axis):
    return x.repeat_interleave(heads // x.shape[head_axis], dim=head_axis)


def sdpa(q, k, v, *, mask=None, bias=None, causal=False, causal_align="upper_left", scale=None,
         dropout_mask=None, dropout_p=0.0, bug=None):
    """``softmax(scale q k^T + bias) v``: q (..., H, L, E), k, v (..., Hkv, S, E|Ev).

    Dropout takes an explicit keep-mask: kept probabilities are scaled by ``1/(1-p)``.
    """
    H, L, E = q.shape[-3:]
    S = k.shape[-2]
    k, v = _repeat_kv(k, H, -3), _repeat_kv(v, H, -3)
    if scale is None:
        scale = 1.0 / E if bug == "scale" else 1.0 / math.sqrt(E)
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    keep = keep_mask(mask, causal, causal_align, L, S, q.device, bug)
    p = masked_softmax(s, keep, dim=-2 if bug == "softmax_axis" else -1)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v


_HAMILTON = {  # S_c = sum over (a, b, sign): sign * Q_a K_b^T   (components r, i, j, k = 0..3)
    0: ((0, 0, 1), (1, 1, -1), (2, 2, -1), (3, 3, -1)),
    1: ((0, 1, 1), (1, 0, 1), (2, 3, 1), (3, 2, -1)),
    2: ((0, 2, 1), (1, 3, -1), (2, 0, 1), (3, 1, 1)),
    3: ((0, 3, 1), (1, 2, 1), (2, 1, -1), (3, 0, 1)),
}


def quaternion_attention(q, k, v, *, mode="shared", mask=None, bias=None, causal=False,
                         causal_align="upper_left", scale=None, bug=None):
    """Shared-score or Hamilton quaternion attention: q (..., H, L, 4, d) -> (..., H, L, 4, dv)."""
    H, L, _, d = q.shape[-4:]
    S = k.shape[-3]
    k, v = _repeat_kv(k, H, -4), _repeat_kv(v, H, -4)
    if scale is None:
        scale = 1.0 / math.sqrt(d if bug == "scale" else 4 * d)
    keep = keep_mask(mask, causal, causal_align, L, S, q.device, bug)
    axis = -2 if bug == "softmax_axis" else -1
    extra = 0.0 if bias is None else bias
    if mode == "shared":
        s = torch.einsum("...lcu,...scu->...ls", q, k)                 # Re(Q K*) = sum_c Q_c K_c^T
        p = masked_softmax(scale * s + extra, keep, axis)
        return torch.einsum("...ls,...scu->...lcu", p, v)
    out = []
    for c in range(4):
        terms = _HAMILTON[c]
        if bug == "hamilton_sign" and c == 1:
            terms = terms[:2] + ((2, 3, -1),) + terms[3:]             # + Q_j K_k^T flipped
        s = sum(sign * q[..., a, :] @ k[..., b, :].transpose(-1, -2) for a, b, sign in terms)
        p = masked_softmax(scale * s + extra, keep, axis)
        out.append(p @ v[..., c, :])
    return torch.stack(out, dim=-2)


def elementwise_attention(q, k, v, *, order=None, causal=False, causal_align="upper_left",
                          scale=1.0, mask=None, bug=None):
    """``o_ic = sum_j w_ijc v_jc / sum_j w_ijc``, ``w = exp(-s (q - k)^2)`` or its Taylor form."""
    H, L, D = q.shape[-3:]
    S = k.shape[-2]
    k, v = _repeat_kv(k, H, -3), _repeat_kv(v, H, -3)
    qi, kj = q[..., :, None, :], k[..., None, :, :]                # (..., L, 1, D), (..., 1, S, D)
    if order is None:
        w = torch.exp(-scale * (qi - kj) ** 2)                        # (..., L, S, D)
    else:
        x = (1.0 if bug == "scale" else 2.0) * scale * qi * kj
        taylor = torch.ones_like(x)                                   # Horner: 1 + x(1 + x/2(...))
        for n in range(order, 0, -1):
            taylor = 1.0 + x / n * taylor
        w = torch.exp(-scale * kj ** 2) * taylor
    keep = keep_mask(mask, causal, causal_align, L, S, q.device, bug)
    if keep is not None:
        w = w * torch.broadcast_to(keep, w.shape[:-1])[..., None]
    if bug == "softmax_axis":                                         # normalise over queries
        den = w.sum(-3, keepdim=True)                                 # (..., 1, S, D)
        return (w / torch.where(den > 0, den, torch.ones_like(den)) * v[..., None, :, :]).sum(-2)
    num = (w * v[..., None, :, :]).sum(-2)                            # (..., L, D)
    den = w.sum(-2)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def preconditioned(q, k, v, *, eps=1e-6, stop_gradient=True, preconditioner="row_norm",
                   inner_core="sdpa", bug=None, **inner_options):
    """``O = diag(c) A``, ``A`` = the inner core's output, ``c_i = 1 / (||A_i|| + eps)``.

    ``||A_i||`` is the norm of query row ``i`` over all its features (quaternion: 4 x d).
    """
    inner = {"sdpa": sdpa, "elementwise": elementwise_attention,
             "shared": functools.partial(quaternion_attention, mode="shared"),
             "hamilton": functools.partial(quaternion_attention, mode="hamilton")}[inner_core]
    not_taken = [name for name in inner_options if not accepts(inner, name)]
    if not_taken:       # forwarded options must be ones the inner core takes: else n/a
        raise Unsupported(f"the inner {inner_core} takes no {', '.join(not_taken)}")
    a = inner(q, k, v, bug=bug, **inner_options)
    if preconditioner == "identity":
        return a
    features = (-2, -1) if inner_core in ("shared", "hamilton") else (-1,)
    c = 1.0 / (torch.linalg.vector_norm(a, dim=features, keepdim=True) + eps)
    return (c.detach() if stop_gradient else c) * a


# -- rotary embeddings -------------------------------------------------------------------

def rotate_half(x):
    """Hugging Face Llama's ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` on the two halves."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """GPT-J's ``rotate_every_two``: pairs ``(x_2m, x_2m+1) -> (-x_2m+1, x_2m)``."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary(x, style, base=10000.0, rotary_dim=None, offset=0):
    """Rotary embeddings on ``x (..., T, D)`` at positions ``offset ... offset + T - 1``.

    ``"half"``: Llama's ``q * cos + rotate_half(q) * sin`` with ``cos = cat(c, c)``;
    ``"interleaved"``: GPT-J's with ``cos = repeat_interleave(c, 2)``; the features
    beyond ``rotary_dim`` pass through (GPT-NeoX / GPT-J partial rotary).
    """
    T, D = x.shape[-2:]
    r = D if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    freqs = torch.arange(offset, offset + T, dtype=torch.float64)[:, None] * inv_freq
    if style == "half":
        emb = torch.cat((freqs, freqs), dim=-1)
        turn = rotate_half
    else:
        emb = freqs.repeat_interleave(2, dim=-1)
        turn = rotate_every_two
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + turn(x_rot) * sin, x_pass), dim=-1)


# -- layers -----------------------------------------------------------------------------

def _split(x, heads):
    b, L, d = x.shape
    return x.reshape(b, L, heads, d // heads).transpose(1, 2)          # (b, H, L, d_k)


def _merge(o):
    b, H, L, dk = o.shape
    return o.transpose(1, 2).reshape(b, L, H * dk)


class RealAttention(nn.Module):
    """Standard / optimised / efficient / super multi-head attention with nn.Linear weights."""

    def __init__(self, spec, bug=None):
        super().__init__()
        d, self.spec, self.bug = spec.d_model, spec, bug
        d_kv = spec.kv_heads * spec.head_dim                      # grouped-query keys, values
        proj = spec.projection
        self.q = nn.Linear(d, d, bias=spec.bias)
        if proj in ("standard", "optimised"):
            self.k = nn.Linear(d, d_kv, bias=spec.bias)
        if proj == "standard":
            self.v = nn.Linear(d, d_kv, bias=spec.bias)
        if proj == "super":
            l = spec.options["seq_len"]
            self.w_a = nn.Parameter(torch.zeros(l, l))
        self.o = nn.Linear(d, d, bias=spec.bias)

    def forward(self, xq, xkv=None, mask=None):
        spec, h = self.spec, self.spec.n_heads
        xkv = xq if xkv is None else xkv
        S = xkv.shape[-2]
        k = self.k(xkv) if hasattr(self, "k") else xkv
        if hasattr(self, "v"):
            v = self.v(xkv)
        elif hasattr(self, "w_a"):
            w_a = self.w_a[:S, :S]
            if spec.causal and self.bug != "causal_leak":
                w_a = torch.tril(w_a)                                  # token i mixes j <= i only
            v = w_a @ xkv
        else:
            v = xkv
        core = dict(spec.core_options)
        hkv = spec.kv_heads
        q, k, v = _split(self.q(xq), h), _split(k, hkv), _split(v, hkv)
        if spec.rotary is not None:
            q = rotary(q, spec.rotary, spec.rotary_base, spec.rotary_dim)
            k = rotary(k, spec.rotary, spec.rotary_base, spec.rotary_dim)
        if spec.core == "preconditioned":
            o = preconditioned(q, k, v, mask=mask, causal=spec.causal, bug=self.bug, **core)
        elif spec.core == "elementwise":
            o = elementwise_attention(q, k, v, causal=spec.causal, mask=mask, bug=self.bug, **core)
        else:
            o = sdpa(q, k, v, mask=mask, causal=spec.causal, bug=None
                     if self.bug == "causal_leak" and spec.projection == "super" else self.bug,
                     **core)
        return self.o(_merge(o))


#: RealAttention's parameters -> refattn's (nn.Linear weights are (d_out, d_in)).
REAL_PARAMS = {
    **{f"{n}.weight": P.linear_weight(f"w_{n}") for n in "qkvo"},
    **{f"{n}.bias": P.same(f"b_{n}") for n in "qkvo"},
    "w_a": P.same("w_a"),
}


class QuaternionLinear(nn.Module):
    """``y = W (x) x + b`` on ``[r | i | j | k]`` blocks; ``weight (4, n_in, n_out)``."""

    def __init__(self, n_in, n_out, bias, bug=None):
        super().__init__()
        self.bug = bug
        self.weight = nn.Parameter(torch.zeros(4, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(4 * n_out)) if bias else None

    def forward(self, x):
        r, i, j, k = self.weight
        rows = [[r, i, j, k], [-i, r, k, -j], [-j, -k, r, i], [-k, j, -i, r]]
        if self.bug == "hamilton_sign":
            rows[1][2] = -k
        m = torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)   # (4 n_in, 4 n_out)
        y = x @ m
        return y if self.bias is None else y + self.bias


class QuaternionAttention(nn.Module):
    """Quaternion Q/K/V/O layers; head h owns units h*dh..(h+1)*dh-1 of every component."""

    def __init__(self, spec, bug=None):
        super().__init__()
        n, self.spec, self.bug = spec.d_model // 4, spec, bug
        for name in "qkvo":
            setattr(self, name, QuaternionLinear(n, n, spec.bias, bug))

    def _chunks(self):
        """Heads as contiguous chunks of the flat vector (``head_layout="chunks"``)."""
        chunks = self.spec.options.get("head_layout", "units") == "chunks"
        return chunks != (self.bug == "head_layout")       # the planted bug: the other layout

    def _heads(self, x):
        b, L, d = x.shape
        H = self.spec.n_heads
        if self._chunks():
            return x.reshape(b, L, H, 4, d // (4 * H)).permute(0, 2, 1, 3, 4)
        return x.reshape(b, L, 4, H, d // (4 * H)).permute(0, 3, 1, 2, 4)   # (b, H, L, 4, dh)

    def forward(self, xq, xkv=None, mask=None):
        xkv = xq if xkv is None else xkv
        o = quaternion_attention(self._heads(self.q(xq)), self._heads(self.k(xkv)),
                                 self._heads(self.v(xkv)), mode=self.spec.core, mask=mask,
                                 causal=self.spec.causal, bug=self.bug,
                                 **self.spec.core_options)
        b, H, L, _, dh = o.shape
        order = (0, 2, 1, 3, 4) if self._chunks() else (0, 2, 3, 1, 4)
        return self.o(o.permute(*order).reshape(b, L, 4 * H * dh))


QUATERNION_PARAMS = {**{f"{n}.weight": P.same(f"w_{n}") for n in "qkvo"},
                     **{f"{n}.bias": P.same(f"b_{n}") for n in "qkvo"}}
