"""comflp: correlation-measure-based fast search for layer pruning of CTC speech transformers."""

__version__ = "0.1.0"
