"""Cost of Semantic Anchor Regularization: the pull loss and a whole training step.

(a) ``anchorlearn.losses.sar._masked_pull`` against (b) the release's dense formulation
(nearest-resized labels, one-hot ``(B, C, h, w)`` map, einsum target ``(B, D, h, w)``, masked
squared error / D): forward+backward time and peak memory, each variant in a fresh process.
(c) The step-time ratio of two small models trained with and without SAR.

    python benchmarks/sar_overhead.py --size 64 128 --repeats 5 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses.sar import SemanticAnchorRegularizer, _masked_pull

IGNORE = 255
BATCH, FEAT_DIM, NUM_CLASSES = 4, 720, 150  # ADE20K with HRNet-W48 FCN


def release_pull(
    features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The release's dense pull: one-hot map of the valid labels, einsum target, masked MSE."""
    h, w = features.shape[2:]
    labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0), anchors.shape[0]).permute(0, 3, 1, 2)
    onehot = onehot.to(features.dtype) * valid[:, None]
    target = torch.einsum("bchw,cd->bdhw", onehot, anchors)
    squared = ((features - target) ** 2).sum(dim=1) * valid
    return squared.sum() / (valid.sum().clamp_min(1) * features.shape[1])


def ours_pull(
    features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    h, w = features.shape[2:]
    labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    return _masked_pull(features, labels, anchors, ignore_index)


PULLS = {"ours": ours_pull, "release": release_pull}


def pull_inputs(size: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, FEAT_DIM, size, size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, 4 * size, 4 * size), generator=gen)
    labels[:, : size // 2] = IGNORE
    anchors = torch.randn(NUM_CLASSES, FEAT_DIM, generator=gen).to(device)
    return features.requires_grad_(), labels.to(device), anchors


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(variant: str, size: int, device: torch.device) -> None:
    """Peak memory of one forward+backward of one variant, in this fresh process."""
    fn = PULLS[variant]
    small = pull_inputs(4, device)
    fn(*small, IGNORE).backward()  # load kernels before the baseline
    features, labels, anchors = pull_inputs(size, device)
    features.grad = torch.zeros_like(features)  # the gradient buffer is common to both
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_mib()
    value = fn(features, labels, anchors, IGNORE)
    value.backward()
    sync(device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = rss_mib() - base
    print(json.dumps({"value": float(value), "peak": peak}))


def pull_times(size: int, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Forward+backward times of both variants, interleaved in this process."""
    features, labels, anchors = pull_inputs(size, device)
    times: dict[str, list[float]] = {name: [] for name in PULLS}
    for repeat in range(repeats + 1):
        for name, fn in PULLS.items():
            features.grad = None
            sync(device)
            start = time.perf_counter()
            fn(features, labels, anchors, IGNORE).backward()
            sync(device)
            if repeat:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return times


def run_child(variant: str, size: int, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", variant, "--size", str(size)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{variant} at {size}x{size} failed: {result.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_agreement(device: torch.device) -> None:
    features, labels, anchors = pull_inputs(16, device, seed=1)
    values, grads = [], []
    for fn in PULLS.values():
        features.grad = None
        value = fn(features, labels, anchors, IGNORE)
        value.backward()
        values.append(value.detach())
        grads.append(features.grad.clone())
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


# --- (c) training steps ------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four 3x3 convolutions on 28x28x1, global pooling, linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        chans = [1, 32, 32, width, width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1),
                nn.BatchNorm2d(chans[i + 1]),
            ]
            layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if i % 2 == 1 else [])
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)
        self.feat_dim = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.classifier(features), features


class SmallSegNet(nn.Module):
    """Conv encoder (stride 4) and decoder back to full resolution, 1x1 conv classifier."""

    def __init__(self, num_classes: int = 11, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.encoder = nn.Sequential(
            *block(3, width), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2)
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), *block(4 * width, 2 * width),
            nn.Upsample(scale_factor=2), *block(2 * width, width),
        )  # fmt: skip
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.feat_dim = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.decoder(self.encoder(x))
        return self.classifier(features), features


def fit_projector(sar: SemanticAnchorRegularizer, features, labels, steps: int = 300) -> bool:
    """Train only the projector on the aux CE until the gate opens (pull active in timing)."""
    opt = torch.optim.Adam(sar.projector.parameters(), lr=1e-2)
    for _ in range(steps):
        out = sar(features, labels)
        if out["gate_open"]:
            return True
        opt.zero_grad()
        out["aux_ce"].backward()
        opt.step()
    return False


def step_ratio(name: str, model: nn.Module, x, y, num_classes: int, repeats: int) -> dict:
    sar = SemanticAnchorRegularizer(num_classes, model.feat_dim, model.classifier, seed=0)
    opt = torch.optim.SGD([*model.parameters(), *sar.parameters()], lr=1e-3, momentum=0.9)
    with torch.no_grad():
        _, features = model(x)
    fitted = fit_projector(sar, features, y)

    def step(use_sar: bool) -> tuple[float, bool]:
        start = time.perf_counter()
        logits, features = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        gate = False
        if use_sar:
            out = sar(features, y)
            loss = loss + out["loss"]
            gate = out["gate_open"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start, gate

    for use_sar in (False, True):
        step(use_sar)
    base, with_sar, gates = [], [], []
    for _ in range(repeats):
        base.append(step(False)[0])
        elapsed, gate = step(True)
        with_sar.append(elapsed)
        gates.append(gate)
    b, s = statistics.median(base), statistics.median(with_sar)
    return {
        "name": name,
        "base_ms": 1e3 * b,
        "sar_ms": 1e3 * s,
        "ratio": s / b,
        "min_ratio": min(with_sar) / min(base),
        "gate": f"{sum(gates)}/{len(gates)}" + ("" if fitted else " (projector fit failed)"),
    }


# --- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[64, 128], help="feature-map side(s) for (a)/(b)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", help="append the Markdown tables to this file")
    parser.add_argument("--child", choices=sorted(PULLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        child(args.child, args.size[0], device)
        return

    torch.manual_seed(0)
    check_agreement(device)
    mem_unit = "peak MiB (CUDA allocated)" if device.type == "cuda" else "peak MiB (RSS)"
    lines = [
        f"### SAR overhead: {device.type}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}",
        "",
        f"Pull loss, forward+backward, B={BATCH}, D={FEAT_DIM}, C={NUM_CLASSES}, labels at 4x "
        "the feature map, 1/8 ignored; times interleaved in one process, "
        f"median of {args.repeats}; "
        "peak memory of one forward+backward, each variant in a fresh process, above its inputs "
        "and gradient buffer; values and gradients agree (checked).",
        "",
        f"| feature map | ours ms | release ms | speed-up | ours {mem_unit} | "
        f"release {mem_unit} | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in args.size:
        ours, release = run_child("ours", size, args), run_child("release", size, args)
        if ours is None or release is None:
            lines.append(f"| {size}x{size} | failed | | | | | |")
            continue
        rel = abs(ours["value"] - release["value"]) / abs(release["value"])
        assert rel < 1e-5, (ours["value"], release["value"])
        times = pull_times(size, device, args.repeats)
        ours["time"], release["time"] = (statistics.median(times[k]) for k in ("ours", "release"))
        lines.append(
            f"| {size}x{size} | {1e3 * ours['time']:.1f} | {1e3 * release['time']:.1f} | "
            f"{release['time'] / ours['time']:.2f}x | {ours['peak']:.0f} | "
            f"{release['peak']:.0f} | {release['peak'] / max(ours['peak'], 1e-9):.2f}x |"
        )
        print(lines[-1], flush=True)

    torch.manual_seed(0)
    cls = SmallCNN().to(device)
    x_cls = torch.randn(128, 1, 28, 28, device=device)
    y_cls = torch.randint(0, 10, (128,), device=device)
    seg = SmallSegNet().to(device)
    x_seg = torch.randn(16, 3, 64, 64, device=device)
    y_seg = torch.randint(0, 11, (16, 64, 64), device=device)
    y_seg[:, :4] = IGNORE
    rows = [
        step_ratio("4-conv CNN, 28x28x1, batch 128, C=10", cls, x_cls, y_cls, 10, args.repeats),
        step_ratio("enc-dec seg, 64x64x3, batch 16, C=11", seg, x_seg, y_seg, 11, args.repeats),
    ]
    lines += [
        "",
        f"Training step (forward, backward, SGD), interleaved, median of {args.repeats}; "
        "projector pre-fitted so that the gate is open (pull active). Target: ratio <= 1.05.",
        "",
        "| model | step ms | step + SAR ms | ratio (medians) | ratio (minima) | gate open |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['base_ms']:.1f} | {r['sar_ms']:.1f} | {r['ratio']:.3f} | "
            f"{r['min_ratio']:.3f} | {r['gate']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
