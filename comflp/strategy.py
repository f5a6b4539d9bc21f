"""Pruning strategies: pruned layers <-> contiguous blocks, and the strategy JSON.

A strategy prunes a set of 1-based layers; its maximal runs of consecutive
layers are blocks ``[start, end]`` (inclusive). The strategy file, written by
search and read by pruning and fine-tuning, is::

    {"num_layers": 12,
     "candidates": [{"pruned": [1, 3, 4], "blocks": [[1, 1], [3, 4]], "score": 0.97, "cer": 0.15}, ...]}

best first; ``cer`` appears once a candidate has been verified.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import atomic
from .errors import ComflpError


# a cut's repair (comflp.repair), named here so that command lines offer the kinds without importing the model
REPAIR_KINDS = ("none", "affine", "linear")
DEFAULT_REPAIR_RIDGE = 1e-4
DEFAULT_CALIB_UTTS = 128


def to_blocks(pruned: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers.

    >>> to_blocks([1, 3, 4, 7])
    [(1, 1), (3, 4), (7, 7)]
    """
    blocks: list[tuple[int, int]] = []
    for layer in sorted(pruned):
        if blocks and layer == blocks[-1][1] + 1:
            blocks[-1] = (blocks[-1][0], layer)
        else:
            blocks.append((layer, layer))
    return blocks


def layer_number(value: object, where: str = "layer") -> int:
    """A layer number from JSON: an int (not a bool, not 3.0, not "3"); one line otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ComflpError(f"{where} {value!r} is not an integer layer number")
    return value


def from_blocks(blocks: Iterable[Sequence[int]]) -> list[int]:
    """Layers covered by inclusive ``[start, end]`` blocks.

    >>> from_blocks([[1, 1], [3, 4]])
    [1, 3, 4]
    """
    layers: set[int] = set()
    for block in blocks:
        if len(block) != 2:
            raise ComflpError(f"block {list(block)} is not [start, end]")
        start, end = (layer_number(x, "block bound") for x in block)
        if start > end:
            raise ComflpError(f"block {[start, end]} is reversed (start > end)")
        layers.update(range(start, end + 1))
    return sorted(layers)


def check_num_layers(expected: int | None, actual: int, model_name: str) -> None:
    """The ``--num_layers`` check: one line when the flag and the model disagree (None: not given)."""
    if expected is not None and expected != actual:
        raise ComflpError(f"--num_layers {expected} but {model_name} has {actual} layers")


def check_prune_count(num_layers: int, k: int) -> None:
    """ComflpError unless 0 < k < num_layers: pruning removes a layer and keeps one."""
    if not 0 < k < num_layers:
        raise ComflpError(f"cannot prune {k} of {num_layers} layers: need 0 < K < {num_layers}")


def validate(pruned: Iterable[int], num_layers: int) -> list[int]:
    """Sorted unique layers; ComflpError unless all lie in 1..num_layers and 0 < K < num_layers."""
    pruned = list(pruned)
    if len(set(pruned)) != len(pruned):
        raise ComflpError(f"pruned layers {pruned} contain duplicates")
    bad = [p for p in pruned if not 1 <= p <= num_layers]
    if bad:
        raise ComflpError(f"layer(s) {bad} outside the model's layers 1..{num_layers}")
    check_prune_count(num_layers, len(pruned))
    return sorted(pruned)


def parse_layers(text: str) -> list[int]:
    """``"1,3,5"`` or ``"1-3,7"`` -> [1, 2, 3, 7] (order and duplicates kept for validation)."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ComflpError(f"layer range {part!r} is reversed; write it as {b}-{a}")
                layers.extend(range(a, b + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise ComflpError(f"cannot parse layer list {text!r}: use comma-separated numbers such as 1,3,5 or 2-4") from None
    if not layers:
        raise ComflpError("empty layer list")
    return layers


@dataclass
class Candidate:
    """One strategy: pruned layers (1-based, sorted), its coarse score and, once verified, its error rate."""

    pruned: list[int]
    score: float | None = None
    cer: float | None = None

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return to_blocks(self.pruned)

    def to_dict(self) -> dict:
        d: dict = {"pruned": list(self.pruned), "blocks": [list(b) for b in self.blocks]}
        if self.score is not None:
            d["score"] = float(self.score)
        if self.cer is not None:
            d["cer"] = float(self.cer)
        return d


@dataclass
class StrategyFile:
    """A ranked list of candidates for a model of ``num_layers`` layers (best first).

    ``stack``: the layer stack the candidates prune; an encoder-decoder model's ``"decoder"`` is written
    to the file (``"stack": "decoder"``), the encoder (every CTC model's only stack) is the default.
    """

    num_layers: int
    candidates: list[Candidate] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    stack: str = "encoder"

    def to_dict(self) -> dict:
        d = {"num_layers": self.num_layers, "candidates": [c.to_dict() for c in self.candidates]}
        if self.stack != "encoder":
            d["stack"] = self.stack
        if self.meta:
            d["meta"] = self.meta
        return d

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write atomically, one candidate per line (diff- and grep-friendly).

        An existing file is replaced only if comflp wrote it and ``overwrite`` is set.
        """
        from .artifacts import WRITTEN_BY, claim_file, output_lock

        path = claim_file(path, overwrite=overwrite)
        d = self.to_dict()
        stack = f' "stack": "{self.stack}",' if self.stack != "encoder" else ""
        lines = [f'{{"written_by": "{WRITTEN_BY}", "num_layers": {d["num_layers"]},{stack}', ' "candidates": [']
        lines += [f"  {json.dumps(c)}," for c in d["candidates"]]
        lines[-1] = lines[-1].rstrip(",")
        meta = f',\n "meta": {json.dumps(d["meta"], ensure_ascii=False)}' if "meta" in d else ""
        with output_lock(path):
            atomic.write_text(path, "\n".join(lines) + f"\n ]{meta}\n}}\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StrategyFile":
        path = Path(path)
        if not path.is_file():
            raise ComflpError(f"strategy file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            num_layers = int(raw["num_layers"])
            cands = []
            for i, c in enumerate(raw["candidates"]):
                pruned = ([layer_number(x) for x in c["pruned"]] if "pruned" in c else from_blocks(c["blocks"]))
                validate(pruned, num_layers)
                cands.append(Candidate(sorted(pruned), c.get("score"), c.get("cer")))
        except ComflpError as err:
            raise ComflpError(f"{path}: candidate {i + 1}: {err}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ComflpError(f"{path} is not a strategy file ({type(err).__name__}: {err})") from None
        if not cands:
            raise ComflpError(f"{path} holds no candidates")
        stack = raw.get("stack", "encoder")
        if stack not in ("encoder", "decoder"):
            raise ComflpError(f"{path}: stack {stack!r} is neither encoder nor decoder")
        return cls(num_layers, cands, raw.get("meta", {}), stack=stack)

    def pick(self, rank: int) -> Candidate:
        """The 1-based ``rank``-th candidate."""
        if not 1 <= rank <= len(self.candidates):
            raise ComflpError(f"--rank {rank} out of range: the strategy file has {len(self.candidates)} candidate(s)")
        return self.candidates[rank - 1]


def resolve_pruned(num_layers: int, *, strategy: str | os.PathLike | None = None, rank: int = 1,
                   layers: str | None = None, model_name: str = "the model") -> list[int]:
    """The layers to prune, from a strategy file (``--strategy``/``--rank``) or a list (``--layers``).

    Checks the strategy was searched for a model of ``num_layers`` layers and
    that the set is valid for it.
    """
    if strategy is not None:
        sf = StrategyFile.load(strategy)
        if sf.num_layers != num_layers:
            what = "-layer model" if sf.stack == "encoder" else f"-layer {sf.stack}"
            raise ComflpError(f"{strategy} is for a {sf.num_layers}{what} but {model_name} "
                              f"has {num_layers} layers{'' if sf.stack == 'encoder' else ' there'}")
        return sf.pick(rank).pruned
    if layers is not None:
        return validate(parse_layers(layers), num_layers)
    raise ComflpError("say which layers to prune: --strategy FILE [--rank N] or --layers 1,3,5")
