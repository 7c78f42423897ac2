"""How long SAR's gate stays shut: the release's all-classes gate against the per-class gate.

``SemanticAnchorRegularizer(gate="all")`` (the release) starts its semantic anchors, and its
pull, only on a step where *every* one of the ``C`` projected anchors is argmax-correct with
own-class probability above ``update_conf``; ``gate="per_class"`` opens each class on its
own. This script trains the same model with each gate and reports, per class count ``C`` and
seed, the training step at which

* ``gate="all"``: the gate first opens;
* ``gate="per_class"``: 50 %, 90 % and 100 % of the classes have opened;

as a step count and as a fraction of the run; the share of all training steps on which the
pull was active (the release's gate shuts again on any step where one anchor fails it; a
per-class gate, once a class has opened, pulls it on every later step); and the test accuracy
at the end.

Setting (CPU-cheap, as realistic as a synthetic problem gets): a ``C``-class Gaussian
mixture in 64 dimensions (class means N(0, ``--spread``^2 I), unit isotropic noise; with the
default spread neighbouring classes overlap, so the task is not separable: the Bayes
accuracy is well below 100 % and falls with ``C``), ``--per-class`` training and 50 test
points per class, drawn once per seed. Model: MLP 64 -> 256 -> 128 (Linear-BN-ReLU twice;
the 128-d output is the feature SAR reads) -> Linear(128, C) classifier. Loss: CE + SAR with
the release's settings (``update_conf`` 0.8, ``filter_conf`` 0.9, ``aux_weight`` 1,
``pull_weight`` 0.1, EMA momentum 0.999, the default 3-layer projector); SGD lr 0.05,
momentum 0.9, weight decay 5e-4, constant learning rate; batch 128, 2000 steps.
No real data set with 100 or more classes is available on this machine (scikit-learn digits
and Fashion-MNIST have 10), so every class count uses the synthetic mixture.

Single-threaded torch (``torch.set_num_threads(1)``); the defaults take a few minutes of CPU.

    python benchmarks/sar_gate_open.py [--steps 2000] [--classes 10 100 150] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses.sar import SemanticAnchorRegularizer

IN_DIM, HIDDEN, FEAT_DIM = 64, 256, 128
MILESTONES = {"all": ("gate open",), "per_class": ("50 % open", "90 % open", "100 % open")}
THRESHOLDS = {"50 % open": 0.5, "90 % open": 0.9, "100 % open": 1.0}


class MLP(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN),
            nn.BatchNorm1d(HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, FEAT_DIM),
            nn.BatchNorm1d(FEAT_DIM),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(FEAT_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.classifier(features), features


def mixture(num_classes: int, per_class: int, spread: float, seed: int):
    """``(x_train, y_train, x_test, y_test)`` from a Gaussian mixture with class means
    N(0, spread^2 I) and unit noise; 50 test points per class."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    means = spread * torch.randn(num_classes, IN_DIM, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(num_classes).repeat_interleave(n)
        x = means[y] + torch.randn(len(y), IN_DIM, generator=gen)
        return x, y

    return (*draw(per_class), *draw(50))


def train(num_classes: int, gate: str, seed: int, args: argparse.Namespace) -> dict:
    """One run; returns the milestone steps (``None``: not reached) and the test accuracy."""
    x_train, y_train, x_test, y_test = mixture(num_classes, args.per_class, args.spread, seed)
    torch.manual_seed(seed)
    model = MLP(num_classes)
    sar = SemanticAnchorRegularizer(
        num_classes,
        FEAT_DIM,
        model.classifier,
        ignore_index=None,
        seed=seed,
        gate=gate,
        gate_warn_steps=args.steps + 1,  # the table says when it stayed shut
    )
    params = list(model.parameters()) + list(sar.projector.parameters())
    optim = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_train), generator=gen)
    cursor, active = 0, 0
    reached: dict[str, int | None] = dict.fromkeys(MILESTONES[gate])
    for step in range(1, args.steps + 1):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(y_train), generator=gen), 0
        idx = order[cursor : cursor + args.batch]
        cursor += args.batch
        logits, features = model(x_train[idx])
        out = sar(features, y_train[idx])
        loss = F.cross_entropy(logits, y_train[idx]) + out["loss"]
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        active += bool(out["gate_open"])
        if gate == "all":
            if reached["gate open"] is None and out["gate_open"]:
                reached["gate open"] = step
        else:
            fraction = float(out["gate_open_fraction"])
            for name, threshold in THRESHOLDS.items():
                # the fraction is k / C: compare with a tolerance below the threshold
                if reached[name] is None and fraction >= threshold - 1e-9:
                    reached[name] = step
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test)[0].argmax(1) == y_test).float().mean())
    if gate == "all":
        assert (reached["gate open"] is None) == (int(sar.gate_open_step) < 0)
    return {"reached": reached, "accuracy": accuracy, "active": active / args.steps}


def fmt_steps(values: list[int | None], total: int) -> tuple[str, str]:
    steps = " ".join("never" if v is None else str(v) for v in values)
    fractions = [1.0 if v is None else v / total for v in values]
    mean = sum(fractions) / len(fractions)
    prefix = "> " if any(v is None for v in values) else ""
    return steps, f"{prefix}{mean:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 150])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=100, help="training points per class")
    parser.add_argument("--spread", type=float, default=0.35, help="std of the class means")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or min(args.classes) < 2:
        parser.error("--steps must be >= 1, --batch >= 2 and every --classes >= 2")
    torch.set_num_threads(1)

    start = time.perf_counter()
    seeds = " ".join(str(s) for s in args.seeds)
    print(
        f"SAR gate opening: {args.steps} steps, batch {args.batch}, seeds {seeds}; "
        f"{IN_DIM}-d Gaussian mixture (mean spread {args.spread}, {args.per_class} train "
        f"points per class), MLP {IN_DIM}-{HIDDEN}-{FEAT_DIM}; torch {torch.__version__}, "
        f"1 thread, {platform.processor() or platform.machine()}\n"
    )
    print(
        "| C | gate | milestone | step (per seed) | fraction of run (mean) "
        "| pull active (share of steps, mean) | test acc (mean) |"
    )
    print("|---|---|---|---|---|---|---|")
    for num_classes in args.classes:
        for gate in ("all", "per_class"):
            runs = [train(num_classes, gate, seed, args) for seed in args.seeds]
            accuracy = sum(r["accuracy"] for r in runs) / len(runs)
            active = sum(r["active"] for r in runs) / len(runs)
            for i, name in enumerate(MILESTONES[gate]):
                steps, fraction = fmt_steps([r["reached"][name] for r in runs], args.steps)
                acc = f"{active:.3f} | {accuracy:.3f}" if i == 0 else " | "
                print(f"| {num_classes} | {gate} | {name} | {steps} | {fraction} | {acc} |")
    elapsed = time.perf_counter() - start
    print(
        f"\n'never': not reached within {args.steps} steps (counted as the whole run in the "
        f"mean, hence '>'). Chance accuracy is 1/C. Wall time {math.ceil(elapsed)} s."
    )


if __name__ == "__main__":
    main()
