"""The ``training`` study: small models trained end to end with refattn's backward passes.

NumPy only.  The non-attention parts a transformer needs live here, private to the study,
each with a hand-derived backward pass tested by float64 finite differences
(``tests/bench/test_training.py``):

* :mod:`.embedding` patch and token embeddings, :mod:`.layernorm`, :mod:`.mlp` (GELU),
  :mod:`.loss` (weighted cross-entropy), :mod:`.adam`;
* :mod:`.model` the tiny pre-LN transformer around ``refattn.Attention``;
* :mod:`.data` digits (scikit-learn, bundled) and multi-query associative recall;
* :mod:`.train` the loop, :mod:`.claims` the verdict rules, :mod:`.study` the study.

Results and the papers' claims side by side: ``docs/fidelity.md``.
"""

from .study import STUDY

__all__ = ["STUDY"]
