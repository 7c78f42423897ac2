"""Segmentation at the SAR release's sizes: the cost of SAR in a training step, and
sliding-window inference throughput.

One process builds one model (an encoder + FCN head from ``anchorlearn.models``), then
times training steps with and without SAR on the same batches, the two variants
interleaved step by step so that machine noise hits both alike, and reports the ratio of the
medians. Peak memory of each variant is measured on a GPU (``torch.cuda.max_memory_allocated``,
reset between variants). Then ``anchorlearn.inference.segment`` in ``slide`` mode runs over
whole images.

The release's setting is HRNet-W48 + FCN (D = 720) on ADE20K (C = 150), 512x512 crops; on a
GPU with bf16:

    python benchmarks/seg_speed.py --device cuda --precision bf16 --encoder hrnet_w48 \\
        --size 512 --batch 8 --steps 20 --out BENCHMARKS.md

On a CPU use a scaled-down size (and say so):

    python benchmarks/seg_speed.py --encoder hrnet_w18 --size 128 --batch 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from anchorlearn.inference import segment
from anchorlearn.losses.sar import SemanticAnchorRegularizer
from anchorlearn.models import create_model

IGNORE = 255


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def batches(args, device: torch.device, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
        # blocky labels with an ignore band, as real masks have regions and void pixels
        small = torch.randint(0, args.classes, (args.batch, args.size // 32, args.size // 32))
        y = F.interpolate(small[:, None].float(), size=(args.size, args.size), mode="nearest")
        y = y[:, 0].long()
        y[:, : args.size // 16] = IGNORE
        out.append((x.to(device), y.to(device)))
    return out


def open_gate(sar: SemanticAnchorRegularizer, classifier: torch.nn.Module, device) -> int:
    """Train the projector (and the classifier) on SAR's auxiliary CE alone until the gate
    opens, so that the timed steps pay for the pull too; returns the steps it took."""
    optimizer = torch.optim.Adam([*sar.parameters(), *classifier.parameters()], lr=1e-2)
    features = torch.zeros(1, sar.feat_dim, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    for step in range(1, 501):
        out = sar(features, labels)
        if out["gate_open"]:
            return step
        optimizer.zero_grad(set_to_none=True)
        out["aux_ce"].backward()
        optimizer.step()
    raise RuntimeError("SAR's gate did not open in 500 steps of its auxiliary CE")


def train_step(model, sar, optimizer, scaler, x, y, args, device) -> None:
    with autocast(device, args.precision):
        logits, features = model(x)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
        if sar is not None:
            loss = loss + sar(features, y)["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(
        "fcn", num_classes=args.classes, encoder=args.encoder, encoder_kwargs=args.encoder_kwargs
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the release's SAR; its gate is opened before timing, so the pull is paid at every step
    sar = SemanticAnchorRegularizer(args.classes, model.feat_dim, model.classifier).to(device)
    gate_steps = open_gate(sar, model.classifier, device)
    params = [*model.parameters(), *sar.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    data = batches(args, device, 2)
    if args.channels_last:
        data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
    times: dict[str, list[float]] = {"ce": [], "ce+sar": []}
    peaks: dict[str, float] = {}
    variants = {"ce": None, "ce+sar": sar}
    for name, reg in variants.items():  # warm-up (kernels, allocator) and peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            train_step(model, reg, optimizer, scaler, *data[i % 2], args, device)
        sync(device)
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
    for step in range(args.steps):
        order = list(variants) if step % 2 == 0 else list(reversed(variants))
        for name in order:
            sync(device)
            start = time.perf_counter()
            train_step(model, variants[name], optimizer, scaler, *data[step % 2], args, device)
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = [s / c for s, c in zip(times["ce+sar"], times["ce"], strict=True)]

    model.eval()
    images = torch.randn(1, 3, args.infer_size[0], args.infer_size[1], device=device)
    crop = (args.size, args.size)
    stride = (args.size * 2 // 3, args.size * 2 // 3)
    with autocast(device, args.precision):
        segment(model, images, mode="slide", crop_size=crop, stride=stride)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(args.infer_repeats):
            segment(model, images, mode="slide", crop_size=crop, stride=stride)
        sync(device)
    per_image = (time.perf_counter() - start) / args.infer_repeats
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "precision": args.precision,
        "encoder": args.encoder,
        "feat_dim": int(model.feat_dim),
        "classes": args.classes,
        "crop": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "channels_last": args.channels_last,
        "step_seconds": medians,
        "sar_overhead": medians["ce+sar"] / medians["ce"] - 1.0,
        "sar_overhead_paired_median": statistics.median(ratios) - 1.0,
        "sar_gate_open_after_aux_steps": gate_steps,
        "sar_gate_open_at_end": bool(int(sar.gate_open_step) >= 0),
        "peak_memory_gib": peaks or None,
        "slide_image": list(args.infer_size),
        "slide_crop_stride": [list(crop), list(stride)],
        "slide_images_per_second": 1.0 / per_image,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def table(result: dict) -> str:
    t = result["step_seconds"]
    peak = result["peak_memory_gib"]
    memory = f"{peak['ce']:.2f} / {peak['ce+sar']:.2f}" if peak else "n/a (CPU)"
    return "\n".join(
        [
            "| encoder (D) | C | crop x batch | precision | step CE (s) | step CE+SAR (s) | "
            "SAR overhead | peak GiB CE / CE+SAR | slide images/s |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {result['encoder']} ({result['feat_dim']}) | {result['classes']} | "
            f"{result['crop']}² x {result['batch']} | {result['precision']} | {t['ce']:.3f} | "
            f"{t['ce+sar']:.3f} | {100 * result['sar_overhead']:+.1f} % (paired "
            f"{100 * result['sar_overhead_paired_median']:+.1f} %) | {memory} | "
            f"{result['slide_images_per_second']:.2f} "
            f"({result['slide_image'][0]}x{result['slide_image'][1]}) |",
            f"\n{result['device']}, torch {result['torch']}, {result['steps']} timed steps per "
            "variant, interleaved; median step times.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--encoder", default="hrnet_w18")
    parser.add_argument(
        "--encoder-kwargs", type=json.loads, default=None, help='JSON, e.g. {"output_stride": 8}'
    )
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--size", type=int, default=128, help="square training crop")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--infer-size", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="image of the sliding-window test (default: 2 x 4 crops' worth)",
    )  # fmt: skip
    parser.add_argument("--infer-repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="append the table to this file")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if args.infer_size is None:
        args.infer_size = [args.size * 2, args.size * 4]
    if args.steps < 1 or args.batch < 1 or args.size < 32:
        parser.error("--steps and --batch must be >= 1 and --size >= 32")
    result = measure(args)
    text = table(result)
    print(text)
    if args.out:
        with Path(args.out).open("a") as fh:
            fh.write("\n" + text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
