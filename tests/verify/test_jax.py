"""refattn.verify against real JAX (CPU).  JAX compiles per shape: few, small cases."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import refattn  # noqa: E402
import refattn.verify as V  # noqa: E402

SDPA_CASES = ("two batch dims, GQA 4/2", "causal lower_right L<S", "bias (B,1,L,S)",
              "mask with empty row + causal")


def _cases(variant, names):
    return [c for c in refattn.get_variant(variant).cases() if c.name in names]


def test_jax_dot_product_attention_passes_in_float32():
    report = V.verify(jax.nn.dot_product_attention, "sdpa", dtypes=("float32",),
                      cases=_cases("sdpa", SDPA_CASES))
    report.assert_()
    assert report.framework.startswith("jax ")
    assert {c.case for c in report.compared} == set(SDPA_CASES[:3])
    # JAX gives a row with no key left the mean of the values: reported, not hidden.
    (na,) = report.not_run
    assert na.case == "mask with empty row + causal" and "mean of all values" in na.note


def test_jax_float64_has_float32_accuracy_and_the_report_says_so():
    # jax.nn.dot_product_attention computes its softmax in float32 whatever the input dtype.
    report = V.verify(jax.nn.dot_product_attention, "sdpa", dtypes=("float64",),
                      cases=_cases("sdpa", SDPA_CASES[:1]))
    assert not report.ok
    out = [c for c in report.checks if c.quantity == "out"][0]
    assert out.status == "FAIL" and 1e-9 < out.rel < 1e-5      # float32 rounding, not a bug


def _mha(params, xq, xkv=None, mask=None, *, n_heads, causal):
    """Standard multi-head attention in JAX on refattn's parameter names and layout."""
    xkv = xq if xkv is None else xkv

    def proj(x, n):
        y = x @ params[f"w_{n}"]
        return y + params[f"b_{n}"] if f"b_{n}" in params else y

    def heads(x):
        b, L, d = x.shape
        return x.reshape(b, L, n_heads, d // n_heads)            # (B, T, N, H), JAX's layout

    keep = None if mask is None else mask[None, None]
    if causal:
        L, S = xq.shape[-2], xkv.shape[-2]
        tri = jnp.tril(jnp.ones((L, S), bool))
        keep = tri[None, None] if keep is None else keep & tri
    o = jax.nn.dot_product_attention(heads(proj(xq, "q")), heads(proj(xkv, "k")),
                                     heads(proj(xkv, "v")), mask=keep)
    b, L, h, dk = o.shape
    return proj(o.reshape(b, L, h * dk), "o")


def test_jax_layer_function_passes_and_a_bug_is_caught():
    cases = _cases("mha-standard", ("self", "self causal, bias"))

    def factory(spec):
        return lambda p, xq, xkv=None, mask=None: _mha(p, xq, xkv, mask, n_heads=spec.n_heads,
                                                       causal=spec.causal)

    report = V.verify(factory, "mha-standard", framework="jax", dtypes=("float32",), cases=cases)
    report.assert_()
    assert {"dw_q", "db_k", "dxq"} <= {c.quantity for c in report.compared}

    def leaky(spec):                                              # forgets the causal mask
        return lambda p, xq, xkv=None, mask=None: _mha(p, xq, xkv, mask, n_heads=spec.n_heads,
                                                       causal=False)

    report = V.verify(leaky, "mha-standard", framework="jax", dtypes=("float32",), cases=cases)
    assert {c.case for c in report.failures} == {"self causal, bias"}


def test_jax_layer_with_renamed_parameters():
    cases = _cases("mha-standard", ("self",))
    names = {"query": "q", "key": "k", "value": "v", "out": "o"}
    mapping = {f"{long}/kernel": V.params.same(f"w_{short}") for long, short in names.items()}

    def factory(spec):
        def f(p, xq, xkv=None, mask=None):
            renamed = {f"w_{s}": p[f"{long}/kernel"] for long, s in names.items()}
            return _mha(renamed, xq, xkv, mask, n_heads=spec.n_heads, causal=spec.causal)
        return f

    V.verify(factory, "mha-standard", framework="jax", dtypes=("float32",), cases=cases,
             params=mapping).assert_()


def test_jax_local_window_and_seq_lengths_are_mapped():
    names = ("window (3, 1)", "padded seq lengths, causal")
    report = V.verify(jax.nn.dot_product_attention, "sdpa", dtypes=("float32",),
                      cases=_cases("sdpa", names))
    report.assert_()
    assert {c.case for c in report.compared} == set(names)
    assert {"out", "dq", "dk", "dv"} <= {c.quantity for c in report.compared}

    def jax_style(q, k, v, *, local_window_size=None, is_causal=False):   # JAX's names
        t = lambda x: jnp.swapaxes(x, -2, -3)                              # noqa: E731
        return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=is_causal,
                                              local_window_size=local_window_size))

    report = V.verify(jax_style, "sdpa", framework="jax", dtypes=("float32",),
                      cases=_cases("sdpa", names[:1]))
    report.assert_()
    assert len(report.compared) == 4
