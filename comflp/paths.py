"""Where the repository's defaults live.

Every default path is relative to one root, whatever the working directory,
so the paper's commands work from anywhere inside a checkout. The root is
``$COMFLP_HOME`` if set; else the checkout that holds this package (a source
tree or an editable install); else, for an installed wheel, which has no
checkout, the working directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def _root() -> Path:
    if os.environ.get("COMFLP_HOME"):
        return Path(os.environ["COMFLP_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "comflp").is_dir():
        return checkout
    return Path.cwd()


REPO_ROOT: Path = _root()
MODELS_DIR: Path = REPO_ROOT / "models"
DEMO_MODEL_DIR: Path = MODELS_DIR / "demo-12l"
DEMO_WHISPER_DIR: Path = MODELS_DIR / "demo-whisper"
DEMO_SPEECHLLM_DIR: Path = MODELS_DIR / "demo-speechllm"
DEMO_CORPUS_DIR: Path = REPO_ROOT / "AISHELL1" / "demo"
# the embedded corpora by language: Mandarin in the paper's AISHELL1/ layout, English beside it
DEMO_CORPUS_DIRS: dict[str, Path] = {"zh": DEMO_CORPUS_DIR, "en": REPO_ROOT / "corpora" / "demo-en"}

# `comflp <command>` writes its default outputs below the working directory, as any installed tool does; the
# paper's scripts (python dc_analysis.py ...), run from the checkout as the paper did, keep its layout there
_OUTPUTS_IN_WORKING_DIR = False


@contextlib.contextmanager
def outputs_in_working_dir() -> Iterator[None]:
    """Default outputs below the working directory for the block (the ``comflp`` dispatcher's commands)."""
    global _OUTPUTS_IN_WORKING_DIR
    before, _OUTPUTS_IN_WORKING_DIR = _OUTPUTS_IN_WORKING_DIR, True
    try:
        yield
    finally:
        _OUTPUTS_IN_WORKING_DIR = before


def output_root() -> Path:
    """Where default outputs go: the working directory for ``comflp <command>``, else the checkout."""
    return Path.cwd() if _OUTPUTS_IN_WORKING_DIR else REPO_ROOT


def dump_dir() -> Path:
    """Default dir of the matrices (``dump/``)."""
    return output_root() / "dump"


def figure_dir() -> Path:
    """Default dir of the heatmaps (``figure/``)."""
    return output_root() / "figure"


def exp_dir() -> Path:
    """Default dir of experiments, reports and strategy files (``exp/``)."""
    return output_root() / "exp"


def search_log_dir() -> Path:
    """Default dir of the search logs (the paper's ``search_strategy/log/``)."""
    return output_root() / "search_strategy" / "log"


def demo_corpus_dir(language: str = "zh") -> Path:
    """The root of the embedded corpus in ``language`` (zh or en)."""
    return DEMO_CORPUS_DIRS[language]


def demo_split(split: str, language: str = "zh") -> Path:
    """The Kaldi dir of one split (train, dev or test) of the embedded corpus in ``language`` (zh or en)."""
    return DEMO_CORPUS_DIRS[language] / split


def demo_model_dir(num_layers: int) -> Path:
    """Where the embedded demo model of that depth is shipped (``models/demo-<L>l``)."""
    return MODELS_DIR / f"demo-{num_layers}l"


def missing_local_path(name: str) -> bool:
    """True when ``name`` reads as a local path that does not exist, so it must not be tried as a hub id.

    A hub id is ``name`` or ``org/name``. A missing path is one that starts with ``/``, ``.`` or ``~``, has
    more than one ``/``, or whose first component exists here (``models/nonexist`` beside a ``models/`` dir):
    trying those on the hub only ends, after its retries, in a connection error that hides the typo.
    """
    if Path(name).expanduser().exists():
        return False
    parts = Path(name).parts
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1
            or (len(parts) > 1 and Path(parts[0]).exists()))
