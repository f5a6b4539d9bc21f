"""Peak resident memory of `comflp measure` in mode T (svcca, pwcca, cka) on deep, wide random models.

    python bench/measure_memory.py [--cases 48x512,24x1024] [--whole_up_to_gb 6]

Each case builds a random wav2vec2 model of L layers x D width (time and memory
do not depend on the weights), saves it with the demo's feature extractor, and
runs `comflp measure --svcca_mode T --measures svcca,pwcca,cka` over 12
utterances of the embedded corpus in a fresh process, whose peak resident set
(``ru_maxrss`` from ``wait4``) is reported:

- banded: the default ``--moment_memory_gb`` (one layer band per pass);
- whole: the whole [(L+1)D]^2 moment in one pass (the previous behaviour), run
  side by side only where its moment alone stays under ``--whole_up_to_gb``.

Goal: banded peak <= 2.5 GB for 48 x 512. Also prints a projection for
48 x 1280 (MMS-1B's width) from the parts that scale: weights, per-layer
moments and sides, and the band budget. Writes bench/results/measure_memory.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from comflp.cli.argtypes import positive_float, threads
from comflp.atomic import write_json
from comflp.hidden import MOMENT_MEMORY_GB
from comflp.paths import DEMO_MODEL_DIR, REPO_ROOT, demo_split

GB = 1e9


def random_model(num_layers: int, width: int, out: Path) -> int:
    """A random wav2vec2 CTC model of that depth and width saved to ``out``; returns its parameter count."""
    config = Wav2Vec2Config(num_hidden_layers=num_layers, hidden_size=width, num_attention_heads=max(1, width // 64),
                            intermediate_size=4 * width, do_stable_layer_norm=True, feat_extract_norm="layer",
                            vocab_size=32)
    model = Wav2Vec2ForCTC(config)
    model.save_pretrained(out)
    shutil.copy(DEMO_MODEL_DIR / "preprocessor_config.json", out / "preprocessor_config.json")
    return sum(p.numel() for p in model.parameters())


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; return its peak resident set in bytes, its wall seconds and its exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024.0, time.perf_counter() - start, proc.returncode


def projection(num_layers: int, width: int, params: int, budget_gb: float) -> float:
    """Bytes the banded run needs beyond the Python/torch baseline, from the parts that scale.

    fp32 weights; per-layer moments (float64 [D, D]) for the layers outside the first band and each
    measure's per-layer side (svcca: [D, k], pwcca: two [k, k]), k <= D; the band moment itself.
    """
    layer_block = 8.0 * width * width * (num_layers + 1)
    return 4.0 * params + layer_block * (1 + 3) + budget_gb * 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="48x512,24x1024", help="LxD cases (default: %(default)s)")
    p.add_argument("--data_dir", type=Path, default=demo_split("train"))
    p.add_argument("--whole_up_to_gb", type=positive_float, default=6.0,
                   help="run the whole-moment baseline only when its moment is under this (default: %(default)s)")
    p.add_argument("--threads", type=threads, default=2)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "measure_memory.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            num_layers, width = (int(x) for x in case.split("x"))
            model_dir = Path(tmp) / case
            params = random_model(num_layers, width, model_dir)
            moment = 8.0 * ((num_layers + 1) * width) ** 2
            base = [sys.executable, "-m", "comflp", "measure", "--model", str(model_dir), "--data_dir", str(args.data_dir),
                    "--batch_size", "4", "--iter_num", "3", "--measures", "svcca,pwcca,cka", "--svcca_mode", "T",
                    "--no_plot", "--quiet", "--threads", str(args.threads), "--dump_dir", tmp, "--overwrite"]
            row = {"layers": num_layers, "width": width, "params": params, "whole_moment_gb": moment / GB,
                   "moment_memory_gb": MOMENT_MEMORY_GB}
            rss, secs, rc = peak_rss(base + ["--output", str(Path(tmp) / f"{case}_banded.npz")])
            row.update(banded_peak_gb=rss / GB, banded_seconds=secs, banded_ok=rc == 0)
            if moment / GB <= args.whole_up_to_gb:
                rss, secs, rc = peak_rss(base + ["--moment_memory_gb", "1000",
                                                 "--output", str(Path(tmp) / f"{case}_whole.npz")])
                row.update(whole_peak_gb=rss / GB, whole_seconds=secs, whole_ok=rc == 0)
            rows.append(row)
            whole = (f"whole {row['whole_peak_gb']:.2f} GB in {row['whole_seconds']:.0f} s" if "whole_peak_gb" in row
                     else f"whole not run (its moment alone is {moment / GB:.1f} GB)")
            print(f"{case}: {params / 1e6:.0f}M params; banded peak {row['banded_peak_gb']:.2f} GB in "
                  f"{row['banded_seconds']:.0f} s; {whole}", flush=True)
            shutil.rmtree(model_dir)
    # 48 x 1280: MMS-1B's shape; the wav2vec2 config of that shape has the parameter count computed here
    mms = Wav2Vec2Config(num_hidden_layers=48, hidden_size=1280, num_attention_heads=16, intermediate_size=5120)
    mms_params = _count_params(mms)
    baseline = min(r["banded_peak_gb"] * GB - projection(r["layers"], r["width"], r["params"], MOMENT_MEMORY_GB)
                   for r in rows)
    projected = (projection(48, 1280, mms_params, MOMENT_MEMORY_GB) + max(baseline, 0.0)) / GB
    print(f"48x1280 projection: {mms_params / 1e6:.0f}M params, banded peak ~{projected:.1f} GB "
          f"(whole moment alone {8.0 * (49 * 1280) ** 2 / GB:.0f} GB)")
    write_json(args.output, {"cases": rows, "projection_48x1280": {"params": mms_params, "banded_peak_gb": projected},
                             "machine": platform.processor() or platform.machine()})


def _count_params(config: Wav2Vec2Config) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in Wav2Vec2ForCTC(config).parameters())


if __name__ == "__main__":
    main()
