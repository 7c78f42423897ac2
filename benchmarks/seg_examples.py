"""A picture of segmentation runs side by side: image, ground truth and each run's prediction
for a few test images (each run scored with its own inference settings).

    python benchmarks/seg_examples.py runs/camvid/ce/seed0 runs/camvid/ce_sar/seed0 \\
        --names CE "CE + SAR" --images 12 60 140 200 --out docs/img/camvid_examples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from anchorlearn.engine.rundir import last_checkpoint
from anchorlearn.engine.runner import RunError, load_run
from anchorlearn.engine.segmentation import SegmentationFilesDataModule, run_inference
from anchorlearn.viz.masks import plot_segmentation_examples


@torch.no_grad()
def predict(run_dir: Path, split: str, indices: list[int]) -> tuple[np.ndarray, dict]:
    """Predicted class maps ``(N, H, W)`` of a run for the images ``indices`` of ``split``."""
    cfg, dm, module = load_run(last_checkpoint(run_dir))
    if not isinstance(dm, SegmentationFilesDataModule):
        raise RunError(f"{run_dir} is not a run on a segmentation data set")
    module.eval()
    dataset = dm.dataset(split)
    maps = []
    for index in indices:
        image, _ = dataset[index]
        x = dm.normalize_images(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
        maps.append(run_inference(module.model, x, cfg.inference).argmax(1)[0].numpy())
    return np.stack(maps), {"dataset": dataset, "palette": dm.palette, "names": dm.class_names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--names", nargs="+", default=None, help="column titles of the runs")
    parser.add_argument("--images", nargs="+", type=int, default=[0, 1, 2], help="image indices")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    names = args.names or [str(r) for r in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names gives {len(names)} names for {len(args.runs)} runs")
    predictions, info = {}, {}
    for name, run in zip(names, args.runs, strict=True):
        predictions[name], info = predict(run, args.split, args.images)
    dataset = info["dataset"]
    images = np.stack([dataset[i][0] for i in args.images])
    truth = np.stack([dataset[i][1] for i in args.images])
    plot_segmentation_examples(
        images, truth, predictions, info["palette"], args.out, info["names"], args.title
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
