"""The ``anchorlearn`` command line.

Each command registers its own sub-parser in an ``_add_<command>_parser`` function and
runs through the ``handler`` default it sets. Errors a user can fix (bad arguments, missing
files, invalid data) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

# Errors that describe a problem the user can fix: shown as one line, without a traceback.
_USER_ERRORS = {"ValueError", "ConfigError", "RunError", "FileNotFoundError"}


def _run_data_preview(args: argparse.Namespace) -> int:
    from anchorlearn.data.preview import preview, preview_path

    out = preview_path(args.out)  # refused before the data are loaded
    preview(args.spec, out, n=args.n, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect data sources")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    show = data_commands.add_parser(
        "preview",
        help="write a PNG grid of samples and print the class counts",
        description=(
            "SPEC: fashion_mnist | fashion_mnist_lt:IR | digits | cifar10:ROOT | scenes | "
            "npz:PATH | folder:PATH | segfolder:PATH | ade20k:ROOT | cityscapes:ROOT | "
            "pascal_context:ROOT | voc:ROOT | camvid:ROOT"
        ),
    )
    show.add_argument("spec", metavar="SPEC", help="the data source")
    show.add_argument("--out", required=True, metavar="PNG", help="output PNG path")
    show.add_argument("--n", type=int, default=32, help="number of samples (default 32)")
    show.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    show.set_defaults(handler=_run_data_preview)


def _train(args: argparse.Namespace, load: Callable[..., Any], train: Callable[..., Any]) -> int:
    """``fit`` and ``pretrain``: load and validate the config (flags included), train into
    ``--out`` (default ``out_dir/name/seed<k>``), print the metrics."""
    cfg = load(args.config, [*args.set, *_flag_overrides(args)])
    out = args.out or f"{cfg.out_dir}/{cfg.name}/seed{cfg.seed}"
    metrics = train(
        cfg,
        out,
        resume=args.resume,
        plots=not args.no_plots,
        allow_data_change=args.allow_data_change,
    )
    if metrics is not None:
        _print_metrics(metrics)
        print(f"run directory: {out}")
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    from anchorlearn.engine.config import load_config
    from anchorlearn.engine.runner import fit

    return _train(args, load_config, fit)


def _write_metrics(out: Path | None, metrics: dict) -> None:
    """Write the printed metrics to ``--out``; a failed write says they are printed above."""
    from anchorlearn.engine import rundir

    if out is None:
        return
    try:
        rundir.write_json(out, metrics)
    except OSError as err:
        raise rundir.RunError(
            f"could not write the metrics to {out} ({err.strerror or err}); they are printed above"
        ) from err


def _checkpoint_of(path: str, writer: str) -> str:
    """A run folder stands for its ``checkpoints/last.ckpt``; a file is passed as it is."""
    from anchorlearn.engine.rundir import last_checkpoint

    if not Path(path).is_dir():
        return path
    checkpoint = last_checkpoint(path)
    if not checkpoint.is_file():
        raise ValueError(
            f"{path} is a folder without checkpoints/last.ckpt; pass a run folder written by "
            f"`anchorlearn {writer}` or a .ckpt file"
        )
    return str(checkpoint)


def _run_eval(args: argparse.Namespace) -> int:
    from anchorlearn.engine.rundir import check_output_file
    from anchorlearn.engine.runner import evaluate_checkpoint

    out = None if args.out is None else check_output_file(args.out, "--out")

    inference = {
        key: value
        for key, value in (
            ("mode", args.mode),
            ("base_size", args.base_size),
            ("crop_size", args.crop_size),
            ("stride", args.stride),
            ("scales", args.scales),
            ("flip", args.flip),
        )
        if value is not None
    }
    metrics = evaluate_checkpoint(
        _checkpoint_of(args.checkpoint, "fit"),
        split=args.split,
        inference=inference,
        save_masks=args.save_masks,
        accelerator=args.accelerator,
        precision=args.precision,
        allow_data_change=args.allow_data_change,
    )
    _print_metrics(metrics)  # first: a failed write of --out loses nothing
    _write_metrics(out, metrics)
    return 0


def _int_pair(text: str) -> list[int]:
    """``--crop-size`` / ``--stride``: ``H,W`` or one number for both."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W such as 512,512, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers H,W, got {text!r}")
    return values


def _scale_list(text: str) -> list[float]:
    """``--scales``: comma-separated positive numbers."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,1.0,1.5, got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive scales, got {text!r}")
    return values


def _run_compare(args: argparse.Namespace) -> int:
    from anchorlearn.engine.compare import run_comparison

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    table = run_comparison(
        args.configs,
        list(args.seeds),
        args.out,
        overrides=overrides,
        columns=args.columns.split(",") if args.columns else None,
        jobs=args.jobs,
    )
    if table is not None:
        print(table)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from anchorlearn.engine.demo import run_demo

    seeds = tuple(args.seeds)
    run_demo(args.out, seeds=seeds, epochs=args.epochs)
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from anchorlearn.engine.ssl_config import load_pretrain_config
    from anchorlearn.engine.ssl_runner import pretrain

    return _train(args, load_pretrain_config, pretrain)


def _run_probe(args: argparse.Namespace) -> int:
    from anchorlearn.engine.rundir import check_output_file
    from anchorlearn.engine.ssl_runner import probe_checkpoint, probe_floor

    floor = "random_init" if args.random_init else "pixels" if args.pixels else None
    flag = "--random-init" if args.random_init else "--pixels"
    if floor is None:
        for name, given in (("--config", args.config), ("--seed", args.seed), ("--set", args.set)):
            if given is not None and given != []:
                raise ValueError(
                    f"{name} is only for --random-init or --pixels: a checkpoint carries its config"
                )
    elif args.config is None:
        raise ValueError(f"{flag} needs --config: the pretraining config to probe, got none")
    elif args.allow_data_change:
        raise ValueError(f"--allow-data-change is only for --checkpoint, got it with {flag}")
    out = None if args.out is None else check_output_file(args.out, "--out")
    if floor is None:
        metrics = probe_checkpoint(
            _checkpoint_of(args.checkpoint, "pretrain"),
            plot_dir=args.plots,
            allow_data_change=args.allow_data_change,
        )
    else:
        overrides = [*args.set, *([] if args.seed is None else [f"seed={args.seed}"])]
        metrics = probe_floor(args.config, floor, overrides=overrides, plot_dir=args.plots)
    _print_metrics(metrics)  # first: a failed write of --out loses nothing
    _write_metrics(out, metrics)
    return 0


def _seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated non-negative integers, no repeats."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--accelerator`` / ``--devices`` / ``--precision`` / ``--seed`` as ``--set`` overrides,
    so that they are validated with the rest of the config before anything runs."""
    overrides = [
        # strings JSON-quoted, so that --precision 32 stays the string "32"
        f"trainer.{flag}={json.dumps(getattr(args, flag))}"
        for flag in ("accelerator", "devices", "precision", "num_nodes")
        if getattr(args, flag) is not None
    ]
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>20s}: {value:.4f}")


def _add_allow_data_change(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help=f"{what} (its stored data fingerprint differs): a warning instead of an error",
    )


def _add_trainer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set trainer.max_epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--accelerator", choices=["cpu", "gpu", "cuda", "mps", "auto"], default=None
    )
    parser.add_argument("--devices", type=int, default=None, help="processes / GPUs (DDP if > 1)")
    parser.add_argument(
        "--num-nodes", type=int, default=None, help="machines (DDP across nodes; torchrun / SLURM)"
    )
    parser.add_argument(
        "--precision", default=None, help="Lightning precision, e.g. 32-true, bf16-mixed"
    )
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")


def _add_path_argument(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A required path given as the first argument (as to ``compare``) or as ``flag PATH``
    (``--config`` of ``fit`` / ``pretrain``, ``--checkpoint`` of ``eval``);
    :func:`_resolve_path` makes it ``args.<flag>``."""
    metavar = flag.removeprefix("--").upper()
    parser.add_argument("path_arg", nargs="?", metavar=metavar, help=f"{help} (or {flag})")
    parser.add_argument(flag, default=None, help=help)
    parser.set_defaults(path_flag=flag)


def _resolve_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not hasattr(args, "path_flag"):
        return
    flag = args.path_flag
    dest = flag.removeprefix("--")
    given = [path for path in (args.path_arg, getattr(args, dest)) if path is not None]
    metavar = dest.upper()
    usage = f"anchorlearn {args.command} {metavar} (or {flag} {metavar})"
    if not given:
        parser.error(f"{args.command}: no {dest} given; {usage}")
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"{args.command}: two {dest}s given, {given[0]} and {given[1]}; {usage}")
    setattr(args, dest, given[0])


def _add_fit_parser(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit",
        help="train one config and evaluate it on the test split",
        description="Train one config; the run directory gets the resolved config, class "
        "counts, the data fingerprint, CSV logs, checkpoints, metrics.json and plots. It is "
        "locked while the run writes it: a second run into it is refused.",
    )
    _add_path_argument(fit, "--config", "YAML experiment config")
    fit.add_argument("--out", default=None, help="run directory (default out_dir/name/seedN)")
    fit.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last.ckpt"
    )
    fit.add_argument(
        "--no-plots", action="store_true", help="skip the pictures (t-SNE is slow on a CPU)"
    )
    _add_allow_data_change(fit, "resume on data that changed since the run trained")
    _add_trainer_flags(fit)
    fit.set_defaults(handler=_run_fit)


def _add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on the test (or validation) split of the data it was "
        "trained for",
    )
    _add_path_argument(ev, "--checkpoint", "a .ckpt written by anchorlearn fit, or its run folder")
    ev.add_argument(
        "--out", default=None, help="write the metrics JSON here (undefined ones as null)"
    )
    _add_allow_data_change(ev, "evaluate on data that changed since the run trained")
    ev.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="val: the held-out part of the training data, for choosing settings without "
        "looking at the test split (default: test)",
    )
    seg = ev.add_argument_group(
        "segmentation data sets", "override the run's inference section for this evaluation"
    )
    ev.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "cuda", "auto"),
        default="auto",
        help="where to evaluate (default auto: a CUDA GPU when one is visible)",
    )
    ev.add_argument(
        "--precision",
        choices=("32", "bf16", "16"),
        default="32",
        help="bf16 / 16: mixed precision (autocast) on the GPU (default 32)",
    )
    seg.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference mode")
    seg.add_argument(
        "--base-size", type=_int_pair, default=None, metavar="H,W", help="rescale each image to fit"
    )
    seg.add_argument("--crop-size", type=_int_pair, default=None, metavar="H,W")
    seg.add_argument("--stride", type=_int_pair, default=None, metavar="H,W")
    seg.add_argument(
        "--scales", type=_scale_list, default=None, metavar="S1,S2,...", help="e.g. 0.75,1.0,1.25"
    )
    seg.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also average the horizontally flipped image (--no-flip: do not)",
    )
    seg.add_argument(
        "--save-masks", default=None, metavar="DIR", help="write colour prediction PNGs to DIR"
    )
    ev.set_defaults(handler=_run_eval)


def _add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    cmp_ = subparsers.add_parser(
        "compare",
        help="train configs x seeds and tabulate mean and std (resumable)",
        description="Runs every config with every seed under OUT/<name>/seed<k>, skipping "
        "runs that already have metrics.json, then writes OUT/results.md and results.csv.",
    )
    cmp_.add_argument("configs", nargs="+", help="YAML experiment configs")
    cmp_.add_argument(
        "--seeds", type=_seed_list, default="0,1,2", help="comma-separated seeds (default 0,1,2)"
    )
    cmp_.add_argument("--out", required=True, help="output directory")
    cmp_.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    cmp_.add_argument(
        "--columns",
        default=None,
        help="comma-separated metric columns; per_class.<name> for one class",
    )
    cmp_.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at a time, each a single-thread process (default 1: in this process)",
    )
    cmp_.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for all"
    )
    cmp_.set_defaults(handler=_run_compare)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="Fashion-MNIST-LT (IR 100): CE vs EMA prototypes vs CE + SAR, with a report",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument(
        "--seeds", type=_seed_list, default="0", help="comma-separated seeds (default 0)"
    )
    demo.add_argument("--epochs", type=int, default=None, help="epochs per method (default 6)")
    demo.set_defaults(handler=_run_demo)


def _add_pretrain_parser(subparsers: argparse._SubParsersAction) -> None:
    pre = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining (moco, pcl, pauc), then a frozen-feature evaluation",
        description="Pretrain one config (configs/ssl/*.yaml); the run directory gets the "
        "resolved config, CSV logs, checkpoints, metrics.json (linear probe, kNN, alignment, "
        "uniformity, coagulation, NMI/AMI, E-step time) and a t-SNE plot.",
    )
    _add_path_argument(pre, "--config", "YAML pretraining config")
    pre.add_argument("--out", default=None, help="run directory (default out_dir/name/seedN)")
    pre.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last.ckpt"
    )
    pre.add_argument("--no-plots", action="store_true", help="skip the t-SNE picture")
    _add_allow_data_change(pre, "resume on data that changed since the run trained")
    _add_trainer_flags(pre)
    pre.set_defaults(handler=_run_pretrain)


def _add_probe_parser(subparsers: argparse._SubParsersAction) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="re-run the frozen-feature evaluation of a pretraining checkpoint",
        description="Linear probe, kNN, alignment, uniformity, coagulation and NMI/AMI of a "
        "checkpoint written by `anchorlearn pretrain`, on the data it was trained for; or, "
        "with --random-init / --pixels and --config, of the floors a pretrained encoder has "
        "to beat, on the same data and settings.",
    )
    encoder = probe.add_mutually_exclusive_group(required=True)
    encoder.add_argument(
        "--checkpoint", help="a .ckpt written by anchorlearn pretrain, or its run folder"
    )
    encoder.add_argument(
        "--random-init",
        action="store_true",
        help="probe the --config's network as initialised with its seed (no training)",
    )
    encoder.add_argument(
        "--pixels",
        action="store_true",
        help="probe the --config's images as features: flattened, standardised per pixel",
    )
    probe.add_argument(
        "--config", default=None, help="the pretraining config (with --random-init / --pixels)"
    )
    probe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a --config key, e.g. --set data.max_test_samples=1000 (repeatable)",
    )
    probe.add_argument("--seed", type=int, default=None, help="override the --config's seed")
    probe.add_argument(
        "--out", default=None, help="write the metrics JSON here (undefined ones as null)"
    )
    _add_allow_data_change(probe, "probe on data that changed since the run trained")
    probe.add_argument(
        "--plots", default=None, metavar="DIR", help="also draw the t-SNE (tsne.png) into DIR"
    )
    probe.set_defaults(handler=_run_probe)


class _VersionAction(argparse.Action):
    """``--version``: prints ``anchorlearn X (torch Y)`` and exits. The versions are read
    when the flag is given (from the installed metadata, without importing torch), not on
    every start of the command line."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the versions of anchorlearn and torch and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        from anchorlearn import __version__

        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "not installed"
        print(f"anchorlearn {__version__} (torch {torch_version})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="anchorlearn",
        description="Anchor- and prototype-based representation learning.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_fit_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_pretrain_parser(subparsers)
    _add_probe_parser(subparsers)
    _add_data_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _resolve_path(parser, args)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if type(err).__name__ not in _USER_ERRORS:
            raise
        message = " ".join(str(err).split())
        print(f"anchorlearn: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
