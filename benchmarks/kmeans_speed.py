"""k-means speed and quality: faiss vs the torch backend vs scikit-learn.

Data, either
- a Gaussian mixture (default): 60,000 x 128 float32 features around 50 planted centres
  (centres ~ N(0, 4 I), unit-variance isotropic noise, equal weights); or
- real E-step input (``--checkpoint``): the L2-normalised 128-d momentum-encoder
  embeddings of the whole Fashion-MNIST training set (60,000 images) under a pretraining
  checkpoint written by ``anchorlearn pretrain``.

Every method runs Lloyd's algorithm for at most ``--niter`` iterations on all rows (each stops
at a fixed point; the torch backend's warm start runs at most ``--niter`` more on its
subsample first) from one initialisation, on ``--threads`` threads (torch, faiss and scikit-learn's
OpenMP alike); the time shown is the median of ``--repeats`` identical runs:

- faiss, default: :func:`anchorlearn.cluster.kmeans` with its default seeding (greedy
  k-means++ on at most 40·k rows for k <= 1000), every point used by Lloyd;
- faiss, random rows: ``init="random"`` (faiss's own seeding, one restart; PCL keeps the
  best of 5);
- torch: :func:`anchorlearn.cluster.kmeans` with ``backend="torch"`` (default seeding),
  with its default warm start (Lloyd on 256·k random rows first, when N > 512·k) and
  without (``warm_start=0``);
- scikit-learn: ``KMeans(n_init=1, max_iter=niter, algorithm="lloyd", tol=0)`` (greedy
  k-means++ on every row).

``--breakdown`` adds, per k, where the time goes: the seeding and the Lloyd iterations timed
apart (scikit-learn's ``kmeans_plusplus`` on every row, then scikit-learn's, faiss's and the
torch backend's Lloyd from those same seeds, the torch backend's warm start and Lloyd from
them, and this package's seeding alone).

The inertia column is the sum of squared distances of every point to its nearest final
centroid (comparable across rows); ARI compares with the planted labels when the data are
the mixture and k = 50.
``--inertia-seeds S`` adds the inertia of the torch backend with and without its warm start
(or with each warm start of ``--warm-starts``, in rows per cluster) divided by
scikit-learn's, for seeds 0 to S - 1 (one seed's inertia says little about a seeding or a
warm start), with the median over the seeds of one timed run each.
Usage: ``python benchmarks/kmeans_speed.py [--out FILE] [--ks 50 500] [--niter 20]
[--threads 1] [--repeats 3] [--checkpoint CKPT] [--breakdown] [--inertia-seeds S
[--warm-starts R ...]]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from anchorlearn.cluster import kmeans

NUM_CENTRES = 50
Runner = Callable[[np.ndarray, int, int, int], tuple[float, np.ndarray]]


def make_features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(NUM_CENTRES, d))
    labels = rng.integers(NUM_CENTRES, size=n)
    x = centres[labels] + rng.normal(size=(n, d))
    return x.astype(np.float32), labels


def checkpoint_embeddings(path: str) -> np.ndarray:
    """The E-step's input under a pretraining checkpoint: momentum embeddings of the whole
    training set (``data.max_train_samples`` lifted), un-augmented."""
    from anchorlearn.engine.ssl_config import parse_pretrain_config
    from anchorlearn.engine.ssl_runner import (
        PRETRAIN_CONFIG_KEY,
        build_pretrain_run,
        load_pretrain_checkpoint,
    )

    ckpt = load_pretrain_checkpoint(path)
    stored = dict(ckpt[PRETRAIN_CONFIG_KEY])
    stored["data"] = {**stored["data"], "max_train_samples": None}
    dm, module = build_pretrain_run(parse_pretrain_config(stored))
    # the E-step state (assignments of the 6k-image run) is not needed to embed
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("moco.")}
    missing = module.load_state_dict(weights, strict=False).missing_keys
    if any(key.startswith("moco.") for key in missing):
        raise RuntimeError(f"{path}: network weights missing from the checkpoint: {missing}")
    module.eval()
    images = dm.labelled_dataset("train").tensors[0]
    with torch.no_grad():
        chunks = [
            module.moco.embed(dm.preprocess(images[i : i + 1024]), momentum=True)
            for i in range(0, images.shape[0], 1024)
        ]
    return torch.cat(chunks).float().numpy()


def run_anchorlearn(backend: str, init: str | None = None, **options: int | None) -> Runner:
    def run(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray]:
        result = kmeans(
            torch.from_numpy(x), k, niter=niter, seed=seed, backend=backend, init=init, **options
        )
        return result.inertia, result.assignments.numpy()

    return run


def cpu_description() -> str:
    """The CPU's model name and its widest vector extension: faiss's speed depends on it
    far more than torch's and scikit-learn's."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        return model
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{model} ({widest or 'no AVX'})" if flags else model


def library_versions() -> str:
    import sklearn

    try:
        import faiss

        faiss_text = f"faiss {faiss.__version__} ({faiss.get_compile_options().strip()})"
    except ImportError:
        faiss_text = "no faiss"
    return f"{faiss_text}, scikit-learn {sklearn.__version__}"


def run_sklearn(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray]:
    model = KMeans(k, n_init=1, max_iter=niter, algorithm="lloyd", tol=0.0, random_state=seed)
    model.fit(x)
    return float(model.inertia_), model.labels_


def median_time(fn: Callable[[], object], repeats: int, threads: int) -> float:
    times = []
    for _ in range(repeats):
        with threadpool_limits(threads):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def breakdown(
    x: np.ndarray, k: int, niter: int, seed: int, repeats: int, threads: int
) -> list[str]:
    """Seeding and Lloyd timed apart, as Markdown table rows."""
    import faiss

    # the default seeding alone, and the torch backend's Lloyd alone
    from anchorlearn.cluster.kmeans import (
        _WARM_START_ROWS_PER_CLUSTER,
        _init_centroids,
        _lloyd,
        _warm_started_lloyd,
    )

    seeds = kmeans_plusplus(x, k, random_state=seed)[0]

    def sklearn_lloyd() -> None:
        KMeans(k, init=seeds, n_init=1, max_iter=niter, algorithm="lloyd", tol=0.0).fit(x)

    def faiss_lloyd() -> None:
        clus = faiss.Kmeans(
            x.shape[1],
            k,
            niter=niter,
            min_points_per_centroid=1,
            max_points_per_centroid=x.shape[0],
        )
        clus.train(x, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))

    def torch_lloyd() -> None:
        _lloyd(torch.from_numpy(x), torch.from_numpy(seeds).float(), niter, False, False)

    def torch_warm_lloyd() -> None:
        _warm_started_lloyd(
            torch.from_numpy(x),
            torch.from_numpy(seeds).float(),
            niter,
            False,
            False,
            _WARM_START_ROWS_PER_CLUSTER,
            torch.Generator().manual_seed(seed),
        )

    def ours() -> None:
        _init_centroids(torch.from_numpy(x), k, "k-means++", torch.Generator().manual_seed(seed))

    parts = {
        "scikit-learn seeding (greedy k-means++, every row)": lambda: kmeans_plusplus(
            x, k, random_state=seed
        ),
        f"scikit-learn Lloyd, {niter} iterations from those seeds": sklearn_lloyd,
        f"faiss Lloyd, {niter} iterations from the same seeds": faiss_lloyd,
        f"torch-backend Lloyd, {niter} iterations from the same seeds": torch_lloyd,
        "torch-backend warm start, then Lloyd, from the same seeds": torch_warm_lloyd,
        "default seeding of anchorlearn.cluster.kmeans": ours,
    }
    return [
        f"| {k} | {name} | {median_time(fn, repeats, threads):.2f} |" for name, fn in parts.items()
    ]


def inertia_over_seeds(
    x: np.ndarray, k: int, niter: int, seeds: int, threads: int, warm_starts: list[int] | None
) -> list[str]:
    """Inertia of the torch backend relative to scikit-learn's, seed by seed, with each
    warm start of ``warm_starts`` (rows per cluster; default: the backend's default and 0),
    as Markdown table rows. Each run is also timed once: the median over the seeds is a
    rough guide, noisier than the main table's."""
    options = [None, 0] if warm_starts is None else warm_starts
    methods = {
        _warm_start_name(option): run_anchorlearn("torch", warm_start=option) for option in options
    }
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    times: dict[str, list[float]] = {name: [] for name in ["scikit-learn", *methods]}

    def timed(name: str, run: Runner, seed: int) -> float:
        start = time.perf_counter()
        inertia = run(x, k, niter, seed)[0]
        times[name].append(time.perf_counter() - start)
        return inertia

    with threadpool_limits(threads):
        for seed in range(seeds):
            reference = timed("scikit-learn", run_sklearn, seed)
            for name, run in methods.items():
                ratios[name].append(timed(name, run, seed) / reference)
    rows = [f"| {k} | scikit-learn | 1 | - | {np.median(times['scikit-learn']):.2f} | - |"]
    for name, values in ratios.items():
        per_seed = " ".join(f"{v:.5f}" for v in values)
        lower = sum(v <= 1.0 for v in values)
        rows.append(
            f"| {k} | {name} | {np.mean(values):.5f} | {lower} of {seeds} "
            f"| {np.median(times[name]):.2f} | {per_seed} |"
        )
    return rows


def _warm_start_name(option: int | None) -> str:
    if option is None:
        return "torch, default warm start"
    if option == 0:
        return "torch, no warm start"
    return f"torch, warm start on {option}·k rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads for every method")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument("--checkpoint", default=None, help="cluster real embeddings instead")
    parser.add_argument("--breakdown", action="store_true", help="time seeding and Lloyd apart")
    parser.add_argument(
        "--inertia-seeds",
        type=int,
        default=0,
        help="also compare the inertia with scikit-learn's over this many seeds",
    )
    parser.add_argument(
        "--warm-starts",
        type=int,
        nargs="+",
        default=None,
        help="with --inertia-seeds: the torch backend's warm starts to compare, in rows per "
        "cluster (default: its default and 0)",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if args.inertia_seeds < 0:
        parser.error("--inertia-seeds must be >= 0")
    if args.warm_starts is not None and (not args.inertia_seeds or min(args.warm_starts) < 0):
        parser.error("--warm-starts needs --inertia-seeds, and values >= 0")

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        x, planted = checkpoint_embeddings(args.checkpoint), None
        data = f"{x.shape[0]:,} x {x.shape[1]} momentum embeddings of {args.checkpoint}"
    else:
        x, planted = make_features(args.n, args.dim, args.seed)
        data = f"{args.n:,} x {args.dim} Gaussian-mixture features ({NUM_CENTRES} planted centres)"
    methods: dict[str, Runner] = {
        "faiss, default seeding": run_anchorlearn("faiss"),
        "faiss, random rows, one restart (PCL: best of 5)": run_anchorlearn("faiss", "random"),
        "torch, default seeding and warm start": run_anchorlearn("torch"),
        "torch, default seeding, no warm start": run_anchorlearn("torch", warm_start=0),
        "scikit-learn (greedy k-means++)": run_sklearn,
    }
    lines = [
        f"k-means of {data}, {args.niter} Lloyd iterations, one initialisation, seed {args.seed}.",
        f"Machine: {cpu_description()}, {os.cpu_count()} CPU cores; torch {torch.__version__}, "
        f"{library_versions()}; {args.threads} thread(s) for every method, "
        f"median time of {args.repeats} runs.",
        "",
        "| k | method | time (s) | sklearn time / time | inertia | inertia / best "
        "| ARI vs planted |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for k in args.ks:
        rows = []
        for name, run in methods.items():
            outcome: list[tuple[float, np.ndarray]] = []  # same seed: every repeat agrees
            elapsed = median_time(
                lambda: outcome.append(run(x, k, args.niter, args.seed)),  # noqa: B023
                args.repeats,
                args.threads,
            )
            inertia, labels = outcome[-1]
            has_truth = planted is not None and k == NUM_CENTRES
            ari = adjusted_rand_score(planted, labels) if has_truth else None
            rows.append((name, elapsed, inertia, ari))
        best = min(r[2] for r in rows)
        sklearn_time = rows[-1][1]
        for name, elapsed, inertia, ari in rows:
            ari_text = "-" if ari is None else f"{ari:.4f}"
            lines.append(
                f"| {k} | {name} | {elapsed:.2f} | {sklearn_time / elapsed:.2f} "
                f"| {inertia:.6g} | {inertia / best:.5f} | {ari_text} |"
            )
        print(lines[-1], flush=True)
    if args.breakdown:
        lines += ["", "| k | part | time (s) |", "|---:|---|---:|"]
        for k in args.ks:
            lines += breakdown(x, k, args.niter, args.seed, args.repeats, args.threads)
    if args.inertia_seeds:
        lines += [
            "",
            f"Inertia / scikit-learn's inertia, seeds 0 to {args.inertia_seeds - 1}:",
            "",
            "| k | method | mean | at or below scikit-learn | median time (s) | per seed |",
            "|---:|---|---:|---:|---:|---|",
        ]
        for k in args.ks:
            lines += inertia_over_seeds(
                x, k, args.niter, args.inertia_seeds, args.threads, args.warm_starts
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
