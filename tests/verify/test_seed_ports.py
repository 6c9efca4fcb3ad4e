"""refattn.verify against float64 PyTorch ports of the seed papers' public modules.

The ports are written here from the published math (``docs/verify.md``, "The seed
papers' code"), not copied:

* the official shared-score ``QuaternionMultiHeadAttention`` (Parcollet's
  ``QuaternionLinear`` projections, heads as contiguous chunks, ``finfo.min`` fill);
* Tay et al.'s Hamilton layers (``make_quarternion_mul`` kernels, the four score maps
  of ``quarternion_attention``, one softmax per map);
* NMesaC's Optimised / Efficient / Super ``MultiHeadAttention`` (one module per head,
  biased ``W_q``/``W_k``, ``W_a = nn.Linear(max_len, max_len)``).

Each verifies through its parameter map (:mod:`refattn.verify.params`); a wrong map fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
from refattn import verify as V
from refattn.catalog import layer_case
from refattn.verify import params as P
from refattn.verify.adapters import empty_row_check, torch_keep, under_empty_rows

torch = pytest.importorskip("torch")
nn = torch.nn


# -- the official shared-score code ---------------------------------------------------------------

class ParcolletQuaternionLinear(nn.Module):
    """``r_weight ... k_weight (in/4, out/4)``; ``y = x @ [[r,i,j,k];[-i,r,k,-j];...] + bias``."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        shape = (in_features // 4, out_features // 4)
        for part in "rijk":
            setattr(self, f"{part}_weight", nn.Parameter(torch.zeros(shape)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        r, i, j, k = self.r_weight, self.i_weight, self.j_weight, self.k_weight
        columns = [torch.cat([r, -i, -j, -k], dim=0), torch.cat([i, r, -k, j], dim=0),
                   torch.cat([j, k, r, -i], dim=0), torch.cat([k, -j, i, r], dim=0)]
        y = x @ torch.cat(columns, dim=1)
        return y if self.bias is None else y + self.bias


class SharedScoreMHA(nn.Module):
    """The official multi-head module (no RMSNorm, no dropout): self-attention."""

    def __init__(self, embed_dim, num_heads, bias=True):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            ParcolletQuaternionLinear(embed_dim, embed_dim, bias) for _ in range(4))

    def forward(self, query, attn_mask=None):
        B, L, _ = query.shape
        heads = [p(query).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = heads                                                 # (B, H, L, 4 dh)
        qc, kc, vc = (torch.chunk(x, 4, dim=-1) for x in (q, k, v))
        scores = sum(a @ b.transpose(-2, -1) for a, b in zip(qc, kc)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            while attn_mask.dim() < scores.dim():
                attn_mask = attn_mask.unsqueeze(0)
            scores = scores.masked_fill(attn_mask == 0, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1)
        out = torch.cat([attn @ x for x in vc], dim=-1)                # (B, H, L, 4 dh)
        return self.out_proj(out.transpose(1, 2).contiguous().view(B, L, self.embed_dim))


def _self_only(spec, what):
    if spec.cross:
        raise V.Unsupported(f"{what} is self-attention only")


def _keep_as_mask(mask, spec):
    keep = torch_keep(mask, spec)
    return None if keep is None else torch.from_numpy(np.ascontiguousarray(keep))


def shared_score_candidate(params=None):
    def factory(spec):
        _self_only(spec, "the official shared-score module")
        return SharedScoreMHA(spec.d_model, spec.n_heads, bias=spec.bias)

    def call(module, xq, xkv, mask, spec):
        return module(xq, attn_mask=_keep_as_mask(mask, spec))

    return V.Layer(factory, params=params or (lambda spec: P.asahi_quaternion_params(spec.bias)),
                   call=call, name="official shared-score QuaternionMultiHeadAttention (port)")


def _four_heads_cases():
    """The official experiments' 4 heads: d_model 32, with an empty row."""
    rng = np.random.default_rng(11)
    layer = refattn.Attention(32, 4, projection="quaternion", core="shared", bias=True,
                              head_layout="chunks")
    mask = rng.random((5, 5)) > 0.3
    mask[:, 0], mask[3] = True, False
    return [layer_case(layer, rng.standard_normal((2, 5, 32)), mask=mask, seed=1,
                       name="H=4 d=32, mask (L, S) (empty rows)")]


def _compared(report):
    return [c for c in report.checks if c.status == "ok"]


def test_shared_score_module_verifies_with_the_chunk_layout_and_uniform_rows():
    # Exact, gradients of the empty rows included: the reference runs the cores' uniform rows.
    cases = under_empty_rows(refattn.get_variant("qattn-shared-chunks").cases(), "uniform")
    report = V.verify(shared_score_candidate(), "qattn-shared-chunks", framework="torch",
                      dtypes=("float64",), cases=cases)
    report.assert_()
    assert any("(empty rows)" in c.case for c in _compared(report))
    assert {c.status for c in report.checks} <= {"ok", "n/a"}
    assert all("self-attention only" in c.note for c in report.checks if c.status == "n/a")
    four = V.verify(shared_score_candidate(), "qattn-shared-chunks", framework="torch",
                    dtypes=("float64",), cases=under_empty_rows(_four_heads_cases(), "uniform"))
    four.assert_()
    # verify's own switch (output rows under the convention) agrees.
    V.verify(shared_score_candidate(), "qattn-shared-chunks", framework="torch",
             dtypes=("float64",), empty_rows="uniform").assert_()


def test_shared_score_module_fails_where_refattn_conventions_differ():
    # refattn's own empty-row convention: the finfo.min fill's mean of the values differs.
    zero = V.verify(shared_score_candidate(), "qattn-shared-chunks", framework="torch",
                    dtypes=("float64",))
    failed = {c.case for c in zero.failures}
    assert failed and all("(empty rows)" in name for name in failed)
    # The default per-unit heads are not the official layout.
    units = V.verify(shared_score_candidate(), "qattn-shared", framework="torch",
                     dtypes=("float64",), empty_rows="uniform", cases="test")
    assert not units.ok


def test_shared_score_wrong_map_fails():
    def swapped(spec):
        mapping = P.asahi_quaternion_params(spec.bias)
        mapping["q_proj.i_weight"], mapping["q_proj.j_weight"] = (mapping["q_proj.j_weight"],
                                                                  mapping["q_proj.i_weight"])
        return mapping

    report = V.verify(shared_score_candidate(swapped), "qattn-shared-chunks", framework="torch",
                      dtypes=("float64",), empty_rows="uniform")
    assert report.failures
    assert not report.ok


# -- Tay et al.'s Hamilton layers -----------------------------------------------------------------

class TayHamiltonLinear(nn.Module):
    """``kernel (n_in, 4 n_out)``: ``x @ [[r,-i,-j,-k];[i,r,-k,j];[j,k,r,-i];[k,-j,i,r]]``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(n_in, 4 * n_out))

    def forward(self, x):
        r, i, j, k = torch.split(self.kernel, self.kernel.shape[-1] // 4, dim=-1)
        rows = [torch.cat([r, -i, -j, -k], dim=-1), torch.cat([i, r, -k, j], dim=-1),
                torch.cat([j, k, r, -i], dim=-1), torch.cat([k, -j, i, r], dim=-1)]
        return x @ torch.cat(rows, dim=0)


def tay_score_maps(a, b):
    """The four maps of ``quarternion_attention(a, b)``: the components of ``a (x) b``."""
    ar, ax, ay, az = torch.chunk(a, 4, dim=-1)
    br, bx, by, bz = torch.chunk(b, 4, dim=-1)
    mm = (lambda x, y: x @ y.transpose(-2, -1))
    return [mm(ar, br) - mm(ax, bx) - mm(ay, by) - mm(az, bz),
            mm(ar, bx) + mm(ax, br) + mm(ay, bz) - mm(az, by),
            mm(ar, by) - mm(ax, bz) + mm(ay, br) + mm(az, bx),
            mm(ar, bz) + mm(ax, by) - mm(ay, bx) + mm(az, br)]


class TayHamiltonAttention(nn.Module):
    """Hamilton Q/K/V/O layers (no bias), contiguous heads, one softmax per score map."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        n = d_model // 4
        self.q, self.k, self.v, self.o = (TayHamiltonLinear(n, n) for _ in range(4))

    def _split(self, x):                                  # tensor2tensor's split_heads
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, xq, xkv=None, keep=None):
        xkv = xq if xkv is None else xkv
        q, k, v = self._split(self.q(xq)), self._split(self.k(xkv)), self._split(self.v(xkv))
        q = q * (q.shape[-1] ** -0.5)
        bias = None if keep is None else (~keep).to(q.dtype) * -1e9   # attention_bias
        outputs = []
        for logits, v_c in zip(tay_score_maps(q, k), torch.chunk(v, 4, dim=-1)):
            logits = logits if bias is None else logits + bias
            outputs.append(torch.softmax(logits, dim=-1) @ v_c)
        o = torch.cat(outputs, dim=-1).transpose(1, 2)                # (B, L, H, 4 dh)
        return self.o(o.reshape(*o.shape[:2], -1))


def tay_candidate(params=None):
    what = "Tay et al.'s Hamilton attention"

    def factory(spec):
        if spec.bias:
            raise V.Unsupported(f"{what} has no biases")
        return TayHamiltonAttention(spec.d_model, spec.n_heads)

    def call(module, xq, xkv, mask, spec):
        # An additive -1e9 leaves a fully masked row the softmax of its own scores.
        empty_row_check(None if mask is None else mask.numpy(), spec, what,
                        "the softmax of its unmasked scores (an additive -1e9 bias)")
        return module(xq, xkv, _keep_as_mask(mask, spec))

    return V.Layer(factory, params=params or P.tay_hamilton_params(), call=call,
                   name="Tay et al. Hamilton attention (port)")


def test_tay_hamilton_layers_verify_with_the_signed_kernel_map():
    report = V.verify(tay_candidate(), "qattn-hamilton-chunks", framework="torch",
                      dtypes=("float64",))
    report.assert_()
    assert len({c.case for c in _compared(report)}) >= 4


def test_tay_kernel_is_refattn_with_negated_imaginary_weights():
    rng = np.random.default_rng(3)
    w, x = rng.standard_normal((4, 2, 3)), rng.standard_normal((5, 8))
    layer = TayHamiltonLinear(2, 3).double()
    with torch.no_grad():
        layer.kernel.copy_(torch.from_numpy(P.hamilton_kernel("w").to_candidate({"w": w})))
    expected = refattn.quaternion_linear(x, w)
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-13)
    same_signs = np.concatenate(list(w), axis=-1)                      # [W_r | W_i | W_j | W_k]
    with torch.no_grad():
        layer.kernel.copy_(torch.from_numpy(same_signs))
    assert np.max(np.abs(layer(torch.from_numpy(x)).detach().numpy() - expected)) > 1e-3


def test_tay_wrong_map_fails():
    wrong = {**P.tay_hamilton_params(), "q.kernel": P.hamilton_kernel("w_k"),
             "k.kernel": P.hamilton_kernel("w_q")}
    assert not V.verify(tay_candidate(wrong), "qattn-hamilton-chunks", framework="torch",
                        dtypes=("float64",)).ok


# -- NMesaC's Optimised / Efficient / Super -------------------------------------------------------

class PayBetterHead(nn.Module):
    """One head of ``AttentionLayer`` (``idx`` selects the input slice)."""

    def __init__(self, d_model, d_k, W_a, kind, idx, softmax_dim):
        super().__init__()
        self.d_k, self.kind, self.idx, self.W_a = d_k, kind, idx, W_a
        self.softmax = nn.Softmax(dim=softmax_dim)
        self.W_q = nn.Linear(d_model, d_k)
        if kind == "optimised":
            self.W_k = nn.Linear(d_model, d_k)

    def forward(self, inp_q, inp_k, inp_v):
        Q = self.W_q(inp_q)
        lo, hi = self.idx * self.d_k, (self.idx + 1) * self.d_k
        K = self.W_k(inp_k) if self.kind == "optimised" else inp_k[:, :, lo:hi]
        S = self.softmax((Q @ K.permute(0, 2, 1)) / math.sqrt(self.d_k))
        V_ = inp_v[:, :, lo:hi]
        if self.kind == "super":
            V_ = self.W_a(V_.permute(0, 2, 1)).permute(0, 2, 1)
        return S @ V_


class PayBetterMHA(nn.Module):
    """``MultiHeadAttention(n_heads, d_model, d_k, d_v, max_len, layer_type)``."""

    def __init__(self, n_heads, d_model, max_len, kind, softmax_dim=-1):
        super().__init__()
        d_k = d_model // n_heads
        self.layers = nn.Sequential()
        self.W_a = nn.Linear(max_len, max_len) if kind == "super" else None
        for i in range(n_heads):
            self.layers.add_module(f"Attention_Layer {i}",
                                   PayBetterHead(d_model, d_k, self.W_a, kind, i, softmax_dim))
        self.W_o = nn.Linear(n_heads * d_k, d_model)

    def forward(self, inp_q, inp_k, inp_v):
        return self.W_o(torch.cat([layer(inp_q, inp_k, inp_v) for layer in self.layers], dim=2))


def pay_better_candidate(kind, softmax_dim=-1, params=None):
    def factory(spec):
        if spec.causal:
            raise V.Unsupported("the pay-better-attention modules have no causal mask")
        return PayBetterMHA(spec.n_heads, spec.d_model, spec.options.get("seq_len", 0), kind,
                            softmax_dim)

    def call(module, xq, xkv, mask, spec):
        if mask is not None:
            raise V.Unsupported("the pay-better-attention modules take no mask")
        kv = xq if xkv is None else xkv
        return module(xq, kv, kv)

    return V.Layer(factory,
                   params=params or (lambda spec: P.pay_better_attention_params(kind,
                                                                                spec.n_heads)),
                   call=call, name=f"pay-better-attention {kind} (port)")


def _pay_better_cases(kind):
    """Self (with and without biases) and cross-attention; Super at S = max_len = seq_len."""
    rng = np.random.default_rng(7)
    extra = {"seq_len": 6} if kind == "super" else {}
    cases = []
    for bias in (False, True):
        layer = refattn.Attention(16, 2, projection=kind, bias=bias, **extra)
        cases.append(layer_case(layer, rng.standard_normal((2, 6, 16)), seed=bias,
                                name=f"self L=6, bias={bias}"))
    layer = refattn.Attention(16, 2, projection=kind, bias=True, **extra)
    cases.append(layer_case(layer, rng.standard_normal((2, 4, 16)),
                            rng.standard_normal((2, 6, 16)), seed=2, name="cross L=4 S=6"))
    return cases


@pytest.mark.parametrize("kind", ["optimised", "efficient", "super"])
def test_pay_better_attention_modules_verify(kind):
    report = V.verify(pay_better_candidate(kind), f"mha-{kind}", framework="torch",
                      dtypes=("float64",), cases=_pay_better_cases(kind))
    report.assert_()
    assert len({c.case for c in _compared(report)}) == 3


@pytest.mark.parametrize("kind", ["optimised", "efficient", "super"])
def test_pay_better_attention_published_softmax_axis_fails(kind):
    """The published PyTorch module normalises over dim=1 of (B, L, S): the queries."""
    report = V.verify(pay_better_candidate(kind, softmax_dim=1), f"mha-{kind}",
                      framework="torch", dtypes=("float64",), cases=_pay_better_cases(kind))
    assert not report.ok


def test_pay_better_attention_wrong_map_fails():
    def transposed(spec):                       # W_a loaded transposed: V = W_A^T X
        mapping = P.pay_better_attention_params("super", spec.n_heads)
        mapping["layers.Attention_Layer 0.W_a.weight"] = P.linear_weight("w_a")
        return mapping

    report = V.verify(pay_better_candidate("super", params=transposed), "mha-super",
                      framework="torch", dtypes=("float64",), cases=_pay_better_cases("super"))
    assert not report.ok


def test_block_maps_cover_each_parameter_once():
    names = ["w_q", "w_k", "w_o", "b_q", "b_k", "b_o"]
    mapping = P.pay_better_attention_params("optimised", 2)
    resolved = P.resolve_map(mapping, names, list(mapping))
    assert len(resolved) == len(mapping)
    del mapping["layers.Attention_Layer 1.W_q.weight"]
    with pytest.raises(ValueError, match=r"missing \['w_q'\]"):
        P.resolve_map(mapping, names, list(mapping))
    mapping["layers.Attention_Layer 1.W_q.weight"] = P.head_block("w_q", 0, 2)
    with pytest.raises(ValueError, match=r"mapped twice \['w_q'\]"):
        P.resolve_map(mapping, names, list(mapping))
    with pytest.raises(ValueError, match=r"kind must be"):
        P.pay_better_attention_params("standard", 2)
