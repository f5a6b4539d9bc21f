"""Front-ends of the paper's workflow whose implementation has not landed yet.

They exist so the paper's layout is complete and say plainly what is missing
instead of pretending to work.
"""

from __future__ import annotations

import sys

MESSAGES = {
    "clip_finetune_train.py": "fine-tuning a pruned model (with optional distillation) is not built yet",
    "average_model_pts.py": "checkpoint averaging is not built yet (it comes with fine-tuning)",
}


def refuse(script: str) -> None:
    """Print one line naming what is missing and exit with status 2."""
    print(f"error: {script}: {MESSAGES[script]}; meanwhile `comflp prune` saves the pruned model "
          "and `python test_asr.py --model DIR` tests it", file=sys.stderr)
    raise SystemExit(2)
