"""PyTorch and JAX behind one small interface: arrays in a dtype, and a VJP by their autograd.

Neither framework is a dependency of refattn: each is imported only when a
candidate of that framework is verified.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

__all__ = ["Framework", "TorchFramework", "JaxFramework", "load_framework", "detect_framework",
           "FRAMEWORKS"]

FRAMEWORKS = ("torch", "jax")


class Framework:
    """What the runner needs from a framework.

    ``vjp(f, primals, cotangent, dtype)`` converts the NumPy ``primals`` (arrays or
    dicts of arrays) to ``dtype``, runs ``out = f(*primals)`` and returns
    ``(out, grads, out_dtype)`` as float64 NumPy arrays (dicts stay dicts), the
    gradients computed by the framework's own autograd for ``cotangent``.
    """

    name = ""
    version = ""

    def asarray(self, x, dtype=None):
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def dtype_name(self, x) -> str:
        raise NotImplementedError

    def round(self, x, dtype: str) -> np.ndarray:
        """``x`` rounded to ``dtype`` and returned as float64 (exact)."""
        if dtype == "float64":
            return np.asarray(x, dtype=np.float64)
        return self.to_numpy(self.asarray(x, dtype))

    def precision(self, dtype: str):
        """A context in which ``dtype`` is usable (JAX needs x64 mode for float64)."""
        return contextlib.nullcontext()

    def vjp(self, f, primals, cotangent, dtype):
        raise NotImplementedError

    def forward(self, f, primals, dtype):
        """``(out, out_dtype)`` of ``f(*primals)`` in ``dtype``, without gradients."""
        raise NotImplementedError


class TorchFramework(Framework):
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.version = torch.__version__

    def _dtype(self, dtype):
        return getattr(self.torch, dtype)

    def asarray(self, x, dtype=None):
        if isinstance(x, self.torch.Tensor):
            return x if dtype is None else x.to(self._dtype(dtype))
        x = np.asarray(x)
        t = self.torch.from_numpy(np.ascontiguousarray(x))
        if dtype is not None and x.dtype != bool:
            t = t.to(self._dtype(dtype))
        return t

    def to_numpy(self, x):
        return x.detach().to(self.torch.float64).cpu().numpy()

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def leaves(self, primals, dtype):
        """Tensors requiring grad for ``primals`` (dicts map to dicts) and their flat list."""
        def leaf(a):
            return self.asarray(a, dtype).detach().requires_grad_(True)

        tensors = [{k: leaf(a) for k, a in p.items()} if isinstance(p, dict) else leaf(p)
                   for p in primals]
        flat = [t for p in tensors for t in (p.values() if isinstance(p, dict) else [p])]
        return tensors, flat

    def grad(self, out, flat, cotangent):
        """``torch.autograd.grad`` for ``cotangent``; an unused input gets a zero gradient."""
        torch = self.torch
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the candidate returned {type(out).__name__}, expected a tensor")
        if tuple(out.shape) != tuple(np.shape(cotangent)):
            raise ValueError(f"the candidate returned shape {tuple(out.shape)}, expected "
                             f"{tuple(np.shape(cotangent))}")
        if not out.requires_grad:
            raise ValueError("the candidate's output does not require grad: it is detached "
                             "from every input")
        w = self.asarray(cotangent, self.dtype_name(out))
        grads = torch.autograd.grad(out, flat, grad_outputs=w, allow_unused=True)
        return [np.zeros(tuple(x.shape)) if g is None else self.to_numpy(g)
                for x, g in zip(flat, grads)]

    def vjp(self, f, primals, cotangent, dtype):
        tensors, flat = self.leaves(primals, dtype)
        out = f(*tensors)
        grads = iter(self.grad(out, flat, cotangent))
        shaped = [{k: next(grads) for k in p} if isinstance(p, dict) else next(grads)
                  for p in primals]
        return self.to_numpy(out), shaped, self.dtype_name(out)

    def forward(self, f, primals, dtype):
        tensors = [{k: self.asarray(a, dtype) for k, a in p.items()} if isinstance(p, dict)
                   else self.asarray(p, dtype) for p in primals]
        with self.torch.no_grad():
            out = f(*tensors)
        return self.to_numpy(out), self.dtype_name(out)


class JaxFramework(Framework):
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.version = jax.__version__

    def precision(self, dtype):
        if dtype == "float64":
            return self.jax.enable_x64(True)
        return contextlib.nullcontext()

    def asarray(self, x, dtype=None):
        x = x if hasattr(x, "dtype") else np.asarray(x)
        if dtype is None or x.dtype == bool:
            return self.jnp.asarray(x)
        return self.jnp.asarray(x, dtype=getattr(self.jnp, dtype))

    def to_numpy(self, x):
        x = self.jnp.asarray(x)
        if x.dtype == self.jnp.bfloat16 or x.dtype == self.jnp.float16:
            x = x.astype(self.jnp.float32)
        return np.asarray(x, dtype=np.float64)

    def dtype_name(self, x):
        return str(x.dtype)

    def vjp(self, f, primals, cotangent, dtype):
        jax = self.jax
        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise RuntimeError("JAX float64 needs x64 mode (refattn.verify enables it around "
                               "float64 runs)")
        args = [jax.tree_util.tree_map(lambda a: self.asarray(a, dtype), p) for p in primals]
        # One compiled program per shape: much faster than op-by-op dispatch, and jax.vjp
        # traces the candidate anyway (value-dependent Python control flow fails either way).
        out, pullback = jax.vjp(jax.jit(f), *args)
        if not hasattr(out, "shape"):
            raise TypeError(f"the candidate returned {type(out).__name__}, expected an array")
        if tuple(out.shape) != tuple(np.shape(cotangent)):
            raise ValueError(f"the candidate returned shape {tuple(out.shape)}, expected "
                             f"{tuple(np.shape(cotangent))}")
        grads = pullback(self.asarray(cotangent, self.dtype_name(out)))
        grads = [jax.tree_util.tree_map(self.to_numpy, g) for g in grads]
        return self.to_numpy(out), grads, self.dtype_name(out)

    def forward(self, f, primals, dtype):
        args = [self.jax.tree_util.tree_map(lambda a: self.asarray(a, dtype), p) for p in primals]
        out = self.jax.jit(f)(*args)
        return self.to_numpy(out), self.dtype_name(out)


_LOADED: dict = {}


def load_framework(name: str) -> Framework:
    """The :class:`Framework` for ``"torch"`` or ``"jax"`` (imports it; ImportError if absent)."""
    if name not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {name!r}")
    if name not in _LOADED:
        try:
            _LOADED[name] = TorchFramework() if name == "torch" else JaxFramework()
        except ImportError as exc:
            raise ImportError(f"verifying a {name} candidate needs {name} installed: {exc}") \
                from exc
    return _LOADED[name]


def _module_of(obj) -> str:
    obj = getattr(obj, "func", obj)                      # functools.partial
    mod = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    return mod.split(".")[0]


def detect_framework(candidate) -> str | None:
    """``"torch"`` or ``"jax"`` when the candidate tells (its module, an ``nn.Module``), else None.

    Only frameworks already imported are consulted: detection never imports one.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        obj = getattr(candidate, "func", candidate)
        if isinstance(obj, torch.nn.Module) or (isinstance(obj, type)
                                                and issubclass(obj, torch.nn.Module)):
            return "torch"
    mod = _module_of(candidate)
    if mod in ("torch", "jax", "jaxlib", "flax"):
        return "torch" if mod == "torch" else "jax"
    return None
