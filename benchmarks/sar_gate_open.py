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
and Fashion-MNIST have 10), so the default uses the synthetic mixture.

``--data fmnist_triples`` trains on real pixels instead: each image stacks three
Fashion-MNIST items as its three channels, and its class is the ordered triple of their
classes (1,000 possible triples; each seed draws its ``C`` of them, so at C = 150 many
classes share two of their three items and differ by one garment, T-shirt against shirt,
say). Every channel of a training image is a Fashion-MNIST training image of the right
class, drawn at random, ``--per-class`` images per class; 50 test images per class from the
Fashion-MNIST test images. Model: the library's ``SmallCNN`` (4 conv layers, width 24,
64-d features) with 3 input channels and its linear classifier.

Single-threaded torch (``torch.set_num_threads(1)``); the defaults take a few minutes of CPU.

    python benchmarks/sar_gate_open.py [--steps 2000] [--classes 10 100 150] [--seeds 0 1 2]
    python benchmarks/sar_gate_open.py --data fmnist_triples --steps 600 --per-class 300
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import anchorlearn.models  # noqa: F401  (registers the models; applies the torchvision shim)
from anchorlearn.data.fashion_mnist import load_fashion_mnist
from anchorlearn.losses.sar import SemanticAnchorRegularizer
from anchorlearn.models.cnn import SmallCNN

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


STACK = 3  # Fashion-MNIST items per image (its channels)
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353


def fmnist_triples(num_classes: int, per_class: int, seed: int):
    """``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 3, 28, 28)`` whose channel
    ``j`` is a Fashion-MNIST image of class ``triple[j]``; class ``k`` is the ``k``-th of
    ``num_classes`` ordered triples drawn from the 1,000 with the seed; 50 test images per
    class from the test split."""
    if not 1 <= num_classes <= 10**STACK:
        raise ValueError(f"--data fmnist_triples has 1 to {10**STACK} classes, got {num_classes}")
    gen = torch.Generator().manual_seed(10_000 + seed)
    codes = torch.randperm(10**STACK, generator=gen)[:num_classes]
    triples = torch.stack([codes // 10 ** (STACK - 1 - j) % 10 for j in range(STACK)], 1)

    def draw(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_fashion_mnist(split)
        images, labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
        pools = [torch.nonzero(labels == c).flatten() for c in range(10)]
        y = torch.arange(num_classes).repeat_interleave(n)
        channels = []
        for j in range(STACK):
            item = triples[y, j]
            pick = torch.empty_like(y)
            for c in range(10):
                where = item == c
                pool = pools[c]
                pick[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=gen)]
            channels.append(images[pick])
        return torch.stack(channels, 1), y

    return (*draw("train", per_class), *draw("test", 50))


def load(num_classes: int, seed: int, args: argparse.Namespace):
    """The data (float inputs) and a fresh model for ``args.data``."""
    if args.data == "mixture":
        data = mixture(num_classes, args.per_class, args.spread, seed)
        torch.manual_seed(seed)
        return data, MLP(num_classes), FEAT_DIM
    x_train, y_train, x_test, y_test = fmnist_triples(num_classes, args.per_class, seed)
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, in_channels=STACK)
    return (_scale(x_train), y_train, _scale(x_test), y_test), model, model.feat_dim


def _scale(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - FMNIST_MEAN) / FMNIST_STD


def train(num_classes: int, gate: str, seed: int, args: argparse.Namespace) -> dict:
    """One run; returns the milestone steps (``None``: not reached) and the test accuracy."""
    (x_train, y_train, x_test, y_test), model, feat_dim = load(num_classes, seed, args)
    sar = SemanticAnchorRegularizer(
        num_classes,
        feat_dim,
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
        predictions = torch.cat([model(x)[0].argmax(1) for x in x_test.split(1024)])
        accuracy = float((predictions == y_test).float().mean())
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
    parser.add_argument(
        "--data",
        choices=("mixture", "fmnist_triples"),
        default="mixture",
        help="synthetic Gaussian mixture, or real Fashion-MNIST items stacked in threes",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or min(args.classes) < 2:
        parser.error("--steps must be >= 1, --batch >= 2 and every --classes >= 2")
    if args.data == "fmnist_triples" and max(args.classes) > 10**STACK:
        parser.error(f"--data fmnist_triples has at most {10**STACK} classes")
    torch.set_num_threads(1)

    start = time.perf_counter()
    seeds = " ".join(str(s) for s in args.seeds)
    if args.data == "mixture":
        setting = (
            f"{IN_DIM}-d Gaussian mixture (mean spread {args.spread}, {args.per_class} train "
            f"points per class), MLP {IN_DIM}-{HIDDEN}-{FEAT_DIM}"
        )
    else:
        setting = (
            f"Fashion-MNIST items stacked in threes ({args.per_class} train images per "
            f"class), SmallCNN with 3 input channels"
        )
    print(
        f"SAR gate opening: {args.steps} steps, batch {args.batch}, seeds {seeds}; "
        f"{setting}; torch {torch.__version__}, "
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
