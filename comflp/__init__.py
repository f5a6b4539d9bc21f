"""comflp: correlation-measure-based fast search for layer pruning of speech transformers.

The library API (imported lazily, so ``import comflp`` stays light for the command lines):

- :func:`load_model`, :func:`read_corpus_dir`: a model with its processor; a Kaldi-style corpus dir (the
  embedded demo corpus is not the library's: ``comflp.demo.corpus.ensure_demo_corpus`` generates it);
- :class:`FineSearch`: one model and one labelled subset, on which strategies are decoded;
- :func:`measure`, :func:`coarse`, :func:`fine`, :func:`comflp_search`: CoMFLP's stages (typed results);
- :func:`glp`: greedy layer pruning, the baseline search by the task metric;
- :func:`prune`: save a pruned model that plain transformers loads; :func:`score`: decode and score a test set.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "comflp.model",
    "read_corpus_dir": "comflp.data",
    "FineSearch": "comflp.verify",
    "MeasureSettings": "comflp.hidden",
    "PAPER_DC": "comflp.stages",
    "measure": "comflp.stages",
    "coarse": "comflp.stages",
    "fine": "comflp.stages",
    "comflp_search": "comflp.stages",
    "glp": "comflp.stages",
    "prune": "comflp.stages",
    "score": "comflp.stages",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'comflp' has no attribute {name!r}")
