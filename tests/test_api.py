"""The README's Python example runs as written (paths moved into a temp dir), through the public API."""

from __future__ import annotations

import os
import re
from pathlib import Path

import comflp

REPO = Path(__file__).resolve().parent.parent


def _readme_python() -> str:
    """The Python block of the README's "Python API" section (the pipeline snippet of "Ship it" reads a wav
    file that is not there; tests/test_transformers_pipeline.py covers what it shows)."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_python_example_runs(tmp_path: Path, capsys) -> None:
    code = _readme_python().replace('"exp/api/', f'"{tmp_path}/')
    # a smaller slice keeps the suite fast; the code path is the README's
    code = code.replace('read_corpus_dir("AISHELL1/demo/test")', 'read_corpus_dir("AISHELL1/demo/test")[:32]')
    code = code.replace('read_corpus_dir("AISHELL1/demo/dev")[:64]', 'read_corpus_dir("AISHELL1/demo/dev")[:16]')
    assert code.count("[:16]") == 1 and code.count("[:32]") == 1
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith("test CER ") and "6 layers" in out[2]
    assert (tmp_path / "pruned-6" / "model.safetensors").is_file()


def test_the_api_names_resolve_and_import_stays_light() -> None:
    for name in comflp.__all__:
        assert getattr(comflp, name) is not None
    import subprocess
    import sys

    heavy = subprocess.run([sys.executable, "-c", "import comflp, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=REPO)
    assert heavy.stdout.strip() == "False"
