"""k-means speed and quality: faiss vs the torch backend vs scikit-learn.

Data: 60,000 x 128 float32 features drawn from a Gaussian mixture with 50 planted centres
(centres ~ N(0, 4 I), unit-variance isotropic noise, equal weights), standing in for real
embeddings, which are not part of this benchmark. Every method runs Lloyd's algorithm for
exactly ``--niter`` iterations from one initialisation:

- faiss: ``faiss.Kmeans`` through :func:`anchorlearn.cluster.kmeans` (faiss's random
  initialisation), every point used for training;
- torch: :func:`anchorlearn.cluster.kmeans` with ``backend="torch"`` (k-means++);
- scikit-learn: ``KMeans(n_init=1, max_iter=niter, algorithm="lloyd", tol=0)`` (greedy
  k-means++).

The inertia column is the sum of squared distances of every point to its nearest final
centroid (comparable across rows); ARI compares with the planted labels when k = 50.
Usage: ``python benchmarks/kmeans_speed.py [--out FILE] [--ks 50 500] [--niter 20]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from anchorlearn.cluster import kmeans

NUM_CENTRES = 50
Runner = Callable[[np.ndarray, int, int, int], tuple[float, np.ndarray]]


def make_features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(NUM_CENTRES, d))
    labels = rng.integers(NUM_CENTRES, size=n)
    x = centres[labels] + rng.normal(size=(n, d))
    return x.astype(np.float32), labels


def run_anchorlearn(
    backend: str,
) -> Callable[[np.ndarray, int, int, int], tuple[float, np.ndarray]]:
    def run(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray]:
        result = kmeans(torch.from_numpy(x), k, niter=niter, seed=seed, backend=backend)
        return result.inertia, result.assignments.numpy()

    return run


def run_sklearn(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray]:
    model = KMeans(k, n_init=1, max_iter=niter, algorithm="lloyd", tol=0.0, random_state=seed)
    model.fit(x)
    return float(model.inertia_), model.labels_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, planted = make_features(args.n, args.dim, args.seed)
    methods: dict[str, Runner] = {
        "faiss (random init)": run_anchorlearn("faiss"),
        "torch (k-means++)": run_anchorlearn("torch"),
        "scikit-learn (k-means++)": run_sklearn,
    }
    lines = [
        f"k-means of {args.n:,} x {args.dim} Gaussian-mixture features ({NUM_CENTRES} planted "
        f"centres), {args.niter} Lloyd iterations, one initialisation.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads).",
        "",
        "| k | method | time (s) | inertia | inertia / best | ARI vs planted |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k in args.ks:
        rows = []
        for name, run in methods.items():
            start = time.perf_counter()
            inertia, labels = run(x, k, args.niter, args.seed)
            elapsed = time.perf_counter() - start
            ari = adjusted_rand_score(planted, labels) if k == NUM_CENTRES else None
            rows.append((name, elapsed, inertia, ari))
        best = min(r[2] for r in rows)
        for name, elapsed, inertia, ari in rows:
            ari_text = "-" if ari is None else f"{ari:.4f}"
            lines.append(
                f"| {k} | {name} | {elapsed:.2f} | {inertia:.6g} | {inertia / best:.4f} "
                f"| {ari_text} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
