"""Where the repository's defaults live.

Every default path is relative to the repository root, whatever the working
directory, so the paper's commands work from anywhere inside a checkout.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
MODELS_DIR: Path = REPO_ROOT / "models"
DEMO_MODEL_DIR: Path = MODELS_DIR / "demo-12l"
DEMO_CORPUS_DIR: Path = REPO_ROOT / "AISHELL1" / "demo"
DUMP_DIR: Path = REPO_ROOT / "dump"
FIGURE_DIR: Path = REPO_ROOT / "figure"
EXP_DIR: Path = REPO_ROOT / "exp"


def demo_split(split: str) -> Path:
    """The Kaldi dir of one split (train, dev or test) of the embedded corpus."""
    return DEMO_CORPUS_DIR / split


def demo_model_dir(num_layers: int) -> Path:
    """Where the embedded demo model of that depth is shipped (``models/demo-<L>l``)."""
    return MODELS_DIR / f"demo-{num_layers}l"
