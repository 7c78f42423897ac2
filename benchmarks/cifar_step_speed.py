"""Training-step throughput of CIFAR ResNet-32 on this machine: images/s of a bare SGD step
(forward, cross-entropy, backward, update) on random 32x32 colour batches, for batch 32 and
128, with the default memory format and channels-last, measured side by side (the settings
take turns, ``--repeats`` rounds, so that a change in the machine's load hits them alike).

    python benchmarks/cifar_step_speed.py [--threads 1] [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from anchorlearn.models import create_model


def _rate(model: torch.nn.Module, batch: int, channels_last: bool, steps: int) -> float:
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            start = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = [(b, cl) for b in (32, 128) for cl in (False, True)]
    models = {}
    for batch, cl in settings:
        model = create_model("resnet32", num_classes=10, in_channels=3)
        models[(batch, cl)] = model.to(memory_format=torch.channels_last) if cl else model
    rates: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for setting in settings:
            rates[setting].append(_rate(models[setting], *setting, args.steps))
    print(
        f"ResNet-32 training step, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}, median of {args.repeats} rounds of {args.steps} steps\n"
    )
    print("| batch | memory format | images/s | vs default format |")
    print("|---|---|---|---|")
    for batch, cl in settings:
        rate = statistics.median(rates[(batch, cl)])
        base = statistics.median(rates[(batch, False)])
        name = "channels-last" if cl else "default"
        print(f"| {batch} | {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
