r"""A tiny pre-LN transformer around one ``refattn.Attention`` layer per block.

::

    h_0 = embed(inputs)                                    (B, N, d)
    for each block b:  h = h + Attn_b(LN_b1(h));  h = h + MLP_b(LN_b2(h))
    f = LN_f(h);  logits = readout(f) W_h + b_h

``embed`` is a patch embedding (image classification) or a sum of key and value token
embeddings (associative recall); ``readout`` is the mean over tokens (one label per
sequence) or the identity (one label per token).  The backward pass is the chain of the
parts' hand-derived backward passes in reverse order, with the attention layers' own
(``refattn.vjp``); a residual connection adds the two branches' gradients.  The mean
read-out's backward spreads ``dr / N`` over the tokens.

All parameters live in ONE flat dict (``"block0.attn.w_q"``, ``"block0.ln1.g"``, ...), so
:class:`~refattn.bench.training.adam.Adam` and :func:`refattn.testing.check_grads` take it
as it is.

Shape legend: ``B`` batch, ``N`` tokens, ``d`` = ``d_model``, ``C`` classes.
"""

from __future__ import annotations

from typing import Any, Callable

import math
import numbers

import numpy as np

from ...layers import Attention
from ...projections._base import linear_backward, linear_forward
from .embedding import (patch_embedding_backward, patch_embedding_forward,
                        token_embedding_backward, token_embedding_forward, _check_patches,
                        _check_tokens)
from .layernorm import layer_norm_backward, layer_norm_forward
from .loss import _check as _check_loss, cross_entropy_backward, cross_entropy_forward
from .mlp import mlp_backward, mlp_forward

__all__ = ["TinyTransformer", "READOUTS"]

READOUTS = ("mean", "tokens")

#: Standard deviation of the learned position table at initialisation (as in ViT).
POS_INIT_STD = 0.02


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class TinyTransformer:
    """Embedding, ``n_blocks`` pre-LN blocks (refattn attention + GELU MLP), LayerNorm, read-out.

    Parameters
    ----------
    d_model, n_heads : int
    n_classes : int
    n_tokens : int
        Tokens per input (patches per image), or the longest sequence (token inputs).
    patch_dim : int, optional
        Pixels per patch: the inputs are patches ``(B, N, patch_dim)``.
    vocab : (int, int), optional
        ``(n_keys, n_values)``: the inputs are id pairs ``(keys, values)``, each ``(B, L)``.
        Exactly one of ``patch_dim`` and ``vocab`` is given.
    readout : {"mean", "tokens"}
    n_blocks : int
    mlp_hidden : int, optional
        Hidden units of the MLP (default ``2 d_model``).
    causal : bool
    backend : str
        Backend of the attention cores (``"reference"`` default: at these sizes NumPy
        beats the numba kernels, which also compile first; see ``docs/fidelity.md``).
    **attention
        ``projection``, ``core`` and their options, as for :class:`refattn.Attention`
        (``seq_len`` of the super projection defaults to ``n_tokens``).

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.bench.training.model import TinyTransformer
    >>> model = TinyTransformer(8, 2, n_classes=3, n_tokens=4, patch_dim=5)
    >>> params = model.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 5))
    >>> model(params, inputs=x).shape
    (2, 3)
    >>> loss, grads = model.loss_and_grads(params, x, np.array([0, 2]))
    >>> sorted(grads) == sorted(params)
    True
    """

    def __init__(self, d_model, n_heads, *, n_classes, n_tokens, patch_dim=None, vocab=None,
                 readout="mean", n_blocks=1, mlp_hidden=None, causal=False, backend="reference",
                 **attention):
        self.d_model = _positive_int(d_model, "d_model")
        self.n_classes = _positive_int(n_classes, "n_classes")
        self.n_tokens = _positive_int(n_tokens, "n_tokens")
        self.n_blocks = _positive_int(n_blocks, "n_blocks")
        self.mlp_hidden = _positive_int(2 * self.d_model if mlp_hidden is None else mlp_hidden,
                                        "mlp_hidden")
        if (patch_dim is None) == (vocab is None):
            raise ValueError("give exactly one of patch_dim (image patches) and vocab "
                             "((n_keys, n_values) token pairs)")
        self.patch_dim = None if patch_dim is None else _positive_int(patch_dim, "patch_dim")
        if vocab is not None:
            if len(vocab) != 2:
                raise ValueError(f"vocab must be (n_keys, n_values), got {vocab!r}")
            vocab = tuple(_positive_int(n, "vocab entry") for n in vocab)
        self.vocab = vocab
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.readout, self.backend = readout, backend
        if attention.get("projection") == "super":
            attention.setdefault("seq_len", self.n_tokens)
        self.layers = [Attention(self.d_model, n_heads, causal=causal, **attention)
                       for _ in range(self.n_blocks)]

    def __repr__(self):
        inputs = f"patch_dim={self.patch_dim}" if self.vocab is None else f"vocab={self.vocab}"
        return (f"TinyTransformer(d_model={self.d_model}, {inputs}, n_tokens={self.n_tokens}, "
                f"n_classes={self.n_classes}, readout={self.readout!r}, n_blocks={self.n_blocks}, "
                f"attention={self.layers[0]!r})")

    # -- parameters -----------------------------------------------------------------
    def _specs(self) -> dict:
        """``{name: (shape, initialiser)}`` of the non-attention parameters, and the layers'."""
        d, m, N = self.d_model, self.mlp_hidden, self.n_tokens
        if self.vocab is None:
            specs = {"embed.w": ((self.patch_dim, d), "linear"), "embed.b": ((d,), "zeros")}
        else:
            specs = {"embed.keys": ((self.vocab[0], d), "table"),
                     "embed.values": ((self.vocab[1], d), "table")}
        specs["embed.pos"] = ((N, d), "position")
        for i, layer in enumerate(self.layers):
            p = f"block{i}."
            specs.update({p + "ln1.g": ((d,), "ones"), p + "ln1.b": ((d,), "zeros")})
            specs.update({p + "attn." + n: (s, "attention") for n, s in
                          layer.param_shapes().items()})
            specs.update({p + "ln2.g": ((d,), "ones"), p + "ln2.b": ((d,), "zeros"),
                          p + "mlp.w1": ((d, m), "linear"), p + "mlp.b1": ((m,), "zeros"),
                          p + "mlp.w2": ((m, d), "linear"), p + "mlp.b2": ((d,), "zeros")})
        specs.update({"final.g": ((d,), "ones"), "final.b": ((d,), "zeros"),
                      "head.w": ((d, self.n_classes), "linear"),
                      "head.b": ((self.n_classes,), "zeros")})
        return specs

    def param_shapes(self) -> dict:
        return {name: shape for name, (shape, _) in self._specs().items()}

    def num_params(self) -> int:
        return int(sum(math.prod(s) for s in self.param_shapes().values()))

    def attention_params(self) -> int:
        """Parameters of the attention layers alone."""
        return int(sum(layer.num_params() for layer in self.layers))

    def init(self, seed=0) -> dict:
        """Float64 parameters: linear maps ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, biases 0,
        LayerNorm gains 1, token tables ``N(0, 1)``, positions ``N(0, 0.02^2)``, attention
        layers by their own ``init``."""
        rng = np.random.default_rng(seed)
        draw: dict[str, Callable[..., Any]] = {
            "zeros": np.zeros,
            "ones": np.ones,
            "table": rng.standard_normal,
            "position": lambda shape: POS_INIT_STD * rng.standard_normal(shape),
            "linear": lambda shape: rng.uniform(-1 / math.sqrt(shape[0]), 1 / math.sqrt(shape[0]),
                                                size=shape),
        }
        params = {name: draw[kind](shape) for name, (shape, kind) in self._specs().items()
                  if kind != "attention"}
        for i, layer in enumerate(self.layers):
            for n, p in layer.init(seed=int(rng.integers(1 << 31))).items():
                params[f"block{i}.attn.{n}"] = p
        return {n: params[n] for n in self.param_shapes()}

    def _check_params(self, params):
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict (from model.init()), got "
                            f"{type(params).__name__}")
        expected = self.param_shapes()
        if set(params) != set(expected):
            raise ValueError(f"params has keys {sorted(set(params) ^ set(expected))} too many or "
                             f"missing for {self!r}")
        for name, shape in expected.items():
            if tuple(np.shape(params[name])) != tuple(shape):
                raise ValueError(f"params[{name!r}] has shape {np.shape(params[name])}, expected "
                                 f"{shape}")

    @staticmethod
    def _sub(params, prefix):
        return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}

    # -- forward / backward ------------------------------------------------------------
    def _embed(self, params, inputs):
        if self.vocab is None:
            _check_patches(inputs, params["embed.w"], params["embed.b"], params["embed.pos"])
            return patch_embedding_forward(inputs, params["embed.w"], params["embed.b"],
                                           params["embed.pos"])
        if not isinstance(inputs, tuple) or len(inputs) != 2:
            raise TypeError("inputs must be a (keys, values) pair of integer arrays (B, L) for "
                            "a model with vocab")
        keys, values = inputs
        _check_tokens(keys, values, params["embed.keys"], params["embed.values"],
                      params["embed.pos"])
        return token_embedding_forward(keys, values, params["embed.keys"],
                                       params["embed.values"], params["embed.pos"])

    def _block_forward(self, params, i, h):
        p = f"block{i}."
        a, ln1 = layer_norm_forward(h, params[p + "ln1.g"], params[p + "ln1.b"])
        layer = self.layers[i]
        y, attn_res = layer.forward(self._sub(params, p + "attn."), a, backend=self.backend)
        h = h + y
        m, ln2 = layer_norm_forward(h, params[p + "ln2.g"], params[p + "ln2.b"])
        z, mlp_res = mlp_forward(m, params[p + "mlp.w1"], params[p + "mlp.b1"],
                                 params[p + "mlp.w2"], params[p + "mlp.b2"])
        return h + z, (ln1, attn_res, ln2, mlp_res)

    def _block_backward(self, i, res, dh, grads):
        p = f"block{i}."
        ln1, attn_res, ln2, mlp_res = res
        dm, grads[p + "mlp.w1"], grads[p + "mlp.b1"], grads[p + "mlp.w2"], grads[p + "mlp.b2"] = \
            mlp_backward(mlp_res, dh)
        dh_mid, grads[p + "ln2.g"], grads[p + "ln2.b"] = layer_norm_backward(ln2, dm)
        dh = dh + dh_mid                                       # residual around the MLP
        dattn, da = self.layers[i].backward(attn_res, dh)
        grads.update({p + "attn." + n: g for n, g in dattn.items()})
        dh_in, grads[p + "ln1.g"], grads[p + "ln1.b"] = layer_norm_backward(ln1, da)
        return dh + dh_in                                      # residual around the attention

    def forward(self, params, inputs):
        """``(logits, residuals)``: ``(B, C)`` (mean read-out) or ``(B, N, C)`` (tokens)."""
        self._check_params(params)
        h, embed_res = self._embed(params, inputs)
        blocks = []
        for i in range(self.n_blocks):
            h, res = self._block_forward(params, i, h)
            blocks.append(res)
        f, final_res = layer_norm_forward(h, params["final.g"], params["final.b"])
        r = f.mean(axis=1) if self.readout == "mean" else f    # (B, d) or (B, N, d)
        logits = linear_forward(np, r, params["head.w"], params["head.b"])
        return logits, (embed_res, blocks, final_res, r, f.shape, params)

    def backward(self, residuals, dlogits):
        """Gradients of every parameter (a dict like ``params``) from ``dlogits``."""
        embed_res, blocks, final_res, r, f_shape, params = residuals
        grads = {}
        dr, grads["head.w"], grads["head.b"] = linear_backward(np, r, params["head.w"], dlogits,
                                                               True)
        if self.readout == "mean":                              # r = mean_N f
            df = np.broadcast_to(dr[:, None, :] / f_shape[1], f_shape)
        else:
            df = dr
        dh, grads["final.g"], grads["final.b"] = layer_norm_backward(final_res, df)
        for i in reversed(range(self.n_blocks)):
            dh = self._block_backward(i, blocks[i], dh, grads)
        if self.vocab is None:
            _, grads["embed.w"], grads["embed.b"], grads["embed.pos"] = \
                patch_embedding_backward(embed_res, dh)
        else:
            grads["embed.keys"], grads["embed.values"], grads["embed.pos"] = \
                token_embedding_backward(embed_res, dh)
        return {n: grads[n] for n in self.param_shapes()}

    def __call__(self, params, *, inputs):
        return self.forward(params, inputs)[0]

    def __refattn_vjp__(self, params, *, inputs):
        logits, res = self.forward(params, inputs)
        return logits, lambda dlogits: self.backward(res, dlogits)

    def loss_and_grads(self, params, inputs, labels, weights=None):
        """``(loss, grads)`` of the weighted cross-entropy of the logits against ``labels``."""
        logits, res = self.forward(params, inputs)
        _check_loss(logits, labels, weights)
        loss, loss_res = cross_entropy_forward(logits, labels, weights)
        return loss, self.backward(res, cross_entropy_backward(loss_res))

    def attention_inputs(self, params, inputs) -> list:
        """``[(layer, layer_params, x)]`` per block: what each attention layer sees.

        For :func:`refattn.layer_conditioning` (condition numbers during training).
        """
        self._check_params(params)
        h, _ = self._embed(params, inputs)
        out = []
        for i, layer in enumerate(self.layers):
            p = f"block{i}."
            a, _ = layer_norm_forward(h, params[p + "ln1.g"], params[p + "ln1.b"])
            out.append((layer, self._sub(params, p + "attn."), a))
            h, _ = self._block_forward(params, i, h)
        return out
