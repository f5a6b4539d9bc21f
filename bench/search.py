"""Coarse-search scaling: exact top-10 for 12 -> 6, beam for L=1000/K=500, exact for L=200/K=100.

    python bench/search.py            # prints a table and writes bench/results/search.json

Targets (this 2-core CPU): exact 12->6 <= 5 ms; beam L=1000 <= 10 s; exact L=200 <= 10 s.
Each timing is the best of --repeat runs; exhaustive is timed beside exact on 12->6 for scale.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from comflp.cli.argtypes import positive_int
from comflp.atomic import write_json
from comflp.search import beam, exact, exhaustive

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "paper" / "dc_mat_mean_bs32_iter10.npy"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def correlation_like(L: int, seed: int) -> np.ndarray:
    """Symmetric, unit diagonal, decaying with layer distance plus noise (like measured matrices)."""
    rng = np.random.default_rng(seed)
    i = np.arange(L + 1)
    m = np.exp(-np.abs(i[:, None] - i[None, :]) / (0.3 * L)) + 0.02 * rng.random((L + 1, L + 1))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=positive_int, default=3)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = p.parse_args()
    paper = np.load(REFERENCE) if REFERENCE.exists() else correlation_like(12, 0)
    rows = [
        ("exact top-10, 12->6 (paper DC matrix)", 0.005, best_of(lambda: exact(paper, 6, 10), args.repeat * 5)),
        ("exhaustive top-10, 12->6 (paper DC matrix)", None, best_of(lambda: exhaustive(paper, 6, 10), args.repeat * 5)),
        ("beam (10), L=1000, K=500", 10.0, best_of(lambda: beam(correlation_like(1000, 1), 500, 10), 1)),
        ("exact top-10, L=200, K=100", 10.0, best_of(lambda: exact(correlation_like(200, 2), 100, 10), 1)),
        ("exact top-10, L=200, K=100 (uniform random matrix)", None,
         best_of(lambda: exact(np.random.default_rng(3).random((201, 201)), 100, 10), 1)),
    ]
    print(f"{'case':<52} {'seconds':>10} {'target':>8}")
    for name, target, sec in rows:
        print(f"{name:<52} {sec:>10.4f} {target if target is not None else '-':>8}")
    write_json(args.output, {"machine": platform.processor() or platform.machine(),
                             "rows": [{"case": n, "seconds": s, "target_seconds": t} for n, t, s in rows]})


if __name__ == "__main__":
    main()
