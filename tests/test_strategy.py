from __future__ import annotations

import json
from pathlib import Path

import pytest

from comflp.errors import ComflpError
from comflp.strategy import Candidate, StrategyFile, from_blocks, parse_layers, to_blocks, validate


def test_blocks_round_trip() -> None:
    pruned = [1, 3, 4, 7, 9, 11]
    assert to_blocks(pruned) == [(1, 1), (3, 4), (7, 7), (9, 9), (11, 11)]
    assert from_blocks(to_blocks(pruned)) == pruned
    assert to_blocks([5, 4, 6]) == [(4, 6)]


def test_json_round_trip_matches_design_format(tmp_path: Path) -> None:
    sf = StrategyFile(12, [Candidate([1, 3, 4, 7, 9, 11], 0.971, 0.153), Candidate([2, 4, 6, 8, 10, 12], 0.9)])
    sf.save(tmp_path / "s.json")
    raw = json.loads((tmp_path / "s.json").read_text())
    assert raw["candidates"][0] == {"pruned": [1, 3, 4, 7, 9, 11], "blocks": [[1, 1], [3, 4], [7, 7], [9, 9], [11, 11]],
                                    "score": 0.971, "cer": 0.153}
    back = StrategyFile.load(tmp_path / "s.json")
    assert back.num_layers == 12 and back.pick(2).pruned == [2, 4, 6, 8, 10, 12] and back.pick(2).cer is None


def test_blocks_only_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"num_layers": 6, "candidates": [{"blocks": [[2, 3]]}]}))
    assert StrategyFile.load(tmp_path / "s.json").pick(1).pruned == [2, 3]


@pytest.mark.parametrize("content, message", [
    ({"num_layers": 6, "candidates": [{"pruned": [7]}]}, "outside"),
    ({"num_layers": 6, "candidates": []}, "no candidates"),
    ({"layers": 6}, "not a strategy file"),
])
def test_bad_strategy_files(tmp_path: Path, content: dict, message: str) -> None:
    (tmp_path / "s.json").write_text(json.dumps(content))
    with pytest.raises(ComflpError, match=message):
        StrategyFile.load(tmp_path / "s.json")


def test_rank_out_of_range_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ComflpError, match="not found"):
        StrategyFile.load(tmp_path / "none.json")
    with pytest.raises(ComflpError, match="--rank 3 out of range"):
        StrategyFile(6, [Candidate([1])]).pick(3)


def test_validate_and_parse() -> None:
    assert validate([3, 1], 4) == [1, 3]
    assert parse_layers("1-3, 7") == [1, 2, 3, 7]
    with pytest.raises(ComflpError, match="0 < K < 4"):
        validate([1, 2, 3, 4], 4)
    with pytest.raises(ComflpError, match="cannot parse"):
        parse_layers("1,x")
