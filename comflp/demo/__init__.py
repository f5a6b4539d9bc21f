"""The embedded default, apart from the library: the synthetic corpus (``corpus``, spoken by ``tts``), the
demo models' training recipes (``recipes``: ``python -m comflp.demo``), their model cards (``card``) and the
demo pipeline (``pipeline``: ``comflp demo``)."""
