"""``comflp demo``: a finished stage is never taken from a run with other settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from comflp.pipeline import main


def test_an_exp_dir_of_other_settings_is_refused_not_resumed(tmp_path: Path, capsys) -> None:
    exp = tmp_path / "demo"
    main(["--exp_dir", str(exp), "--stage", "0", "--stop_stage", "0"])  # the corpus stage: records the settings
    assert (exp / ".done" / "0-corpus").exists()
    with pytest.raises(SystemExit) as err:
        main(["--exp_dir", str(exp), "--num_clip_layers", "4", "--stage", "0", "--stop_stage", "0"])
    assert err.value.code != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "num_clip_layers: 6 there, 4 now" in line and "--force (from stage 0)" in line
    # --force from stage 0 starts that experiment afresh there
    main(["--exp_dir", str(exp), "--num_clip_layers", "4", "--stage", "0", "--stop_stage", "0", "--force"])
    assert (exp / ".done" / "0-corpus").exists()
