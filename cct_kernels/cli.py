"""Command line: `cct-kernels` or `python -m cct_kernels` with subcommands info, bench, profile and train.

    python -m cct_kernels info                      # versions, devices, which backend runs where and why not
    python -m cct_kernels bench                     # the default model on every backend: table, JSON, PNG
    python -m cct_kernels bench --mode both --backends eager,compile,auto --batch 32
    python -m cct_kernels profile --top 15          # torch.profiler per backend: top ops, Chrome traces
    python -m cct_kernels train --epochs 10         # cct_2_3x2_32 on Fashion-MNIST, checkpoints, test accuracy

bench compares each backend with eager and with torch.compile of the eager model on the same weights and
images, checks its logits against eager's, and writes <out>/bench_<model>_<device>_<dtype>.{json,png}.
Every flag is checked before any work starts: a bad one is a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from cct_kernels import backends, profiling
from cct_kernels.cli_bench import MIN_TIME, cmd_bench, cmd_profile, device_name, versions
from cct_kernels.models import MODELS, TEXT_MODELS, list_models
from cct_kernels.train import TrainConfig, train

DEFAULT_OUT = "cct_bench_results"
SPEED_BACKENDS = ("eager", profiling.COMPILE, profiling.COMPILE_GRAPHS, profiling.COMPILE_FROZEN,
                  *backends.KERNEL_BACKENDS, "auto", profiling.ONNXRUNTIME,
                  *(prefix + b
                    for prefix in (profiling.COMPILE_OURS, profiling.COMPILE_GRAPHS_OURS, profiling.GRAPHS,
                                   profiling.FROZEN)
                    for b in (*backends.KERNEL_BACKENDS, "auto")))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: message (see prog --help)`, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------------- validators
def int_at_least(minimum: int):
    """An argparse type: an int >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval (brackets as given)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == float('inf') else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above or value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return parse


def model_name(text: str) -> str:
    """An argparse type: a model factory name; close matches suggested (the full list is 46 names)."""
    if text not in MODELS:
        close = difflib.get_close_matches(text, list(MODELS), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; {hint}cct_kernels.list_models() lists all "
                                         f"{len(MODELS)} names")
    return text


def device_argument(text: str) -> torch.device:
    """An argparse type: cpu, cuda or cuda:N, and only a CUDA device that torch can see."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {count} CUDA device(s), cuda:0..{count - 1}")
    return device


def backend_list(text: str) -> list[str]:
    """An argparse type: a comma-separated list of speed backends, eager moved first (it is the oracle)."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SPEED_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"expected a comma-separated list of {', '.join(SPEED_BACKENDS)}")
    return sorted(names, key=lambda name: name != "eager")


def writable_folder(parser: argparse.ArgumentParser, path: str) -> Path:
    """Create the output folder now and prove a file can be written there, so a bad --out fails before the work."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot write into {str(folder)!r}: {e.strerror or e}")
    return folder


# --------------------------------------------------------------------------------------------------- info
def _auto_description(device: torch.device) -> str:
    order = backends._AUTO_ORDER.get(device.type, ())
    usable = [b for b in order if profiling.backend_reason(b, device) is None]
    chain = " -> ".join(usable + ["eager"])
    return f"per op, the first that serves the call: {chain}"


def extension_description() -> str:
    """What cct_kernels.extension says about the build: its info() dict (or describe() text) when it has one."""
    from cct_kernels import extension

    describe = getattr(extension, "describe", None)
    if callable(describe):
        return str(describe())
    info = getattr(extension, "info", None)
    if callable(info):
        details = info()
        if isinstance(details, dict):
            return "\n".join(f"{key}: {value}" for key, value in details.items())
        return str(details)
    error = extension.load_error()
    return "built" if error is None else error


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def cmd_info(args) -> int:
    """Print versions, devices and, per device, whether each backend can run there (and why not)."""
    print("cct_kernels environment")
    for key, value in versions().items():
        print(f"  {key:<12} {value}")
    print("\nC++/CUDA extension")
    for line in extension_description().splitlines():
        print(f"  {line}")
    for device in devices():
        print(f"\n{device}: {device_name(device)}")
        for name in SPEED_BACKENDS:
            reason = profiling.backend_reason(name, device)
            if name == "auto":
                status = "yes  " + _auto_description(device)
            elif name == "triton" and device.type == "cpu" and backends.availability(device)["triton"] is None:
                status = "tests only (TRITON_INTERPRET=1: the interpreter, not a speed path)"
            else:
                status = "yes" if reason is None else f"no   {reason}"
            print(f"  {name:<8} {status}")
    print("\nModels (cct_kernels.create_model(name); their table: README.md)")
    text = sorted(TEXT_MODELS)
    image = [name for name in list_models() if name not in TEXT_MODELS]
    print(f"  image  {len(image)}: {', '.join(n for n in image if '_sine' not in n)} (each also as *_sine)")
    print(f"  text   {len(text)}: {', '.join(text)} (token ids and a padding mask)")
    return 0


# --------------------------------------------------------------------------------------------------- train
# Every TrainConfig field as an option: argparse keywords with a description and units. progress is --no-progress.
TRAIN_OPTIONS = {
    "model": dict(type=model_name, metavar="NAME",
                  help="model factory name (any of cct_kernels.list_models()), built for 28x28 one-channel images"),
    "dataset": dict(choices=["fashion-mnist", "digits"],
                    help="fashion-mnist: 60k/10k 28x28 images (apt-get install dataset-fashion-mnist); digits: "
                         "scikit-learn's 1797 8x8 digits upscaled to 28x28 (1500 train / 297 test)"),
    "epochs": dict(type=int_at_least(1), metavar="N", help="passes over the training set"),
    "batch_size": dict(type=int_at_least(1), metavar="N", help="images per optimizer step"),
    "lr": dict(type=float_in(0, low_open=True), metavar="LR",
               help="peak learning rate of AdamW, reached after the warmup, then cosine decay to 0"),
    "weight_decay": dict(type=float_in(0), metavar="WD", help="AdamW's decoupled weight decay"),
    "warmup_epochs": dict(type=float_in(0), metavar="EPOCHS",
                          help="linear learning-rate warmup, in epochs (fractions allowed)"),
    "label_smoothing": dict(type=float_in(0, 1, high_open=True), metavar="EPS",
                            help="label smoothing of the cross-entropy loss, in [0, 1)"),
    "augment": dict(action=argparse.BooleanOptionalAction,
                    help="random horizontal flip and shift of up to 2 pixels, per image"),
    "train_subset": dict(type=int_at_least(1), metavar="N",
                         help="train on the first N training images only (default: all)"),
    "test_subset": dict(type=int_at_least(1), metavar="N", help="evaluate on the first N test images (default: all)"),
    "backend": dict(choices=list(backends.BACKENDS),
                    help="backend for every op (default: use_backend / CCT_KERNELS_BACKEND / auto)"),
    "compile": dict(choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="train through torch.compile in this mode (over the backend's ops; reduce-overhead adds "
                         "CUDA graphs on a GPU); evaluation runs uncompiled (default: no compile)"),
    "seed": dict(type=int, metavar="SEED", help="random seed of the weights, the batch order and the augmentation"),
    "out": dict(metavar="DIR", help="folder for checkpoint.pt (every epoch) and history.json; checked writable "
                                    "before training"),
    "resume": dict(action="store_true", help="continue from <out>/checkpoint.pt"),
    "time_limit": dict(type=float_in(0, low_open=True), metavar="MINUTES",
                       help="wall-clock budget in minutes, checked after every step: training stops with a "
                            "checkpoint once it is spent (--resume continues)"),
    "threads": dict(type=int_at_least(1), metavar="N", help="CPU threads for torch (default: torch's choice)"),
    "device": dict(type=lambda text: str(device_argument(text)), metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda when available, under torchrun this process's GPU; "
                        "else cpu)"),
}


def _train_arguments(parser: argparse.ArgumentParser):
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "progress":
            parser.add_argument("--no-progress", action="store_true", help="no progress bar")
            continue
        options = dict(TRAIN_OPTIONS.get(field.name, {"help": f"TrainConfig.{field.name}"}))
        default = getattr(defaults, field.name)
        if options.get("action") != "store_true":
            options["help"] += " (default: %(default)s)" if default is not None else ""
        parser.add_argument(f"--{field.name.replace('_', '-')}", default=default, **options)


def cmd_train(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    config = TrainConfig(**{**options, "out": str(args.out)}, progress=not args.no_progress)
    try:
        history = train(config)
    except FileNotFoundError as e:  # the dataset (or a file to resume from) is missing: a usage error
        print(f"cct-kernels train: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    if history.get("test_accuracy") is None:
        print(f"{config.model} on {config.dataset}: stopped by --time-limit before the first epoch ended; "
              f"checkpoint in {config.out}, continue with --resume")
    else:
        print(f"{config.model} on {config.dataset}: test accuracy {history['test_accuracy']:.4f} "
              f"after {len(history['epochs'])} epochs; history in {config.out}/history.json")
    return 0


# --------------------------------------------------------------------------------------------------- parser
def _common_arguments(parser: argparse.ArgumentParser, default_mode: str | None):
    parser.add_argument("--model", default=profiling.DEFAULT_MODEL, type=model_name, metavar="NAME",
                        help=f"model factory name (default {profiling.DEFAULT_MODEL}; any of "
                             "cct_kernels.list_models())")
    parser.add_argument("--batch", type=int_at_least(1), metavar="N",
                        help="images per step (default 64 on CPU, 128 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(profiling.DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--mode", choices=["inference", "train", "both"], default=default_mode,
                        help="inference forward, training step (forward, backward, AdamW), or both")
    parser.add_argument("--backends", type=backend_list, metavar="LIST",
                        help=f"comma-separated, from {', '.join(SPEED_BACKENDS)} (compile: torch.compile of "
                             "eager; compile-graphs: the same with mode='reduce-overhead' (CUDA graphs); compile:B: "
                             "torch.compile over our ops with backend B; compile-graphs:B: the same with "
                             "mode='reduce-overhead'; graphs:B: inference or the whole training step replayed from a "
                             "CUDA graph; frozen:B: inference after cct_kernels.freeze (weights packed once); "
                             "compile-frozen: inference of torch.compile with inductor's freezing; onnxruntime: the "
                             "eager model exported to ONNX Runtime (CPU, where installed); default: eager, compile, "
                             "on CUDA compile-graphs, each kernel backend that can run on the device, auto, "
                             "compile:auto, on CUDA graphs:auto, on CPU frozen:auto, compile-frozen and onnxruntime "
                             "where installed)")
    parser.add_argument("--dropout", type=float_in(0, 1), metavar="P",
                        help="the model's dropout rate (its factory's `dropout`: the encoder blocks' proj_drop, "
                             "dropout1 and dropout2; default the factory's, 0 for the CCT family); training steps "
                             "draw it")
    parser.add_argument("--device", type=device_argument, help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--warmup", type=int_at_least(0), metavar="N",
                        help="untimed steps per backend before timing (the first includes compiling)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default ./{DEFAULT_OUT}/; checked writable before the work)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cct-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices, backend availability")
    info.set_defaults(func=cmd_info, parser=info)

    bench = sub.add_parser("bench", help="time a model on each backend (table, JSON, PNG)")
    _common_arguments(bench, default_mode=None)
    bench.add_argument("--rounds", "--iters", type=int_at_least(1), metavar="N",
                       help="timed rounds; each round times one step of every backend, in rotating order, on "
                            "CPU right after an untimed step of the same backend (default: as many as --min-time "
                            "allows, at least 5)")
    bench.add_argument("--min-time", type=float_in(0, low_open=True), metavar="SECONDS",
                       help=f"seconds of timed steps per backend and mode (default {MIN_TIME['cpu']:g} on CPU, "
                            f"{MIN_TIME['cuda']:g} on CUDA)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_bench, parser=bench)

    prof = sub.add_parser("profile", help="torch.profiler per backend: top ops, Chrome traces")
    _common_arguments(prof, default_mode="inference")
    prof.add_argument("--iters", type=int_at_least(1), metavar="N",
                      help="profiled steps per backend (default 1 on CPU, 5 on CUDA)")
    prof.add_argument("--top", type=int_at_least(1), default=12, metavar="N", help="ops per backend to show "
                                                                                   "(default 12)")
    prof.add_argument("--by", choices=["ops", "kernels"], help="rank operators or CUDA kernels "
                                                               "(default kernels on CUDA, ops on CPU)")
    prof.set_defaults(func=cmd_profile, parser=prof)

    train_parser = sub.add_parser("train", help="train on Fashion-MNIST (offline), with checkpoints and resume",
                                  description="Train a model on 28x28 one-channel images with AdamW, linear "
                                              "warmup then cosine decay, and label smoothing; checkpoints every "
                                              "epoch into --out.")
    _train_arguments(train_parser)
    train_parser.set_defaults(func=cmd_train, parser=train_parser)
    return parser


def _command_line(argv: list[str] | None) -> str:
    """The command as typed: `python -m cct_kernels ...` or `cct-kernels ...`; for a call main([...]) the
    equivalent `cct-kernels ...` line."""
    if argv is not None:
        return shlex.join(["cct-kernels", *argv])
    if Path(sys.argv[0]).name == "__main__.py":
        return shlex.join(sys.orig_argv)
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _resolve_bench_arguments(args):
    """Fill the device-dependent defaults of bench / profile (device, dtype, batch, backends, modes)."""
    args.device = args.device or profiling.default_device()
    args.dtype = profiling.DTYPES[args.dtype or profiling.default_dtype(args.device)]
    args.batch = args.batch or profiling.default_batch(args.device)
    args.backends = args.backends or profiling.speed_backends(args.device)
    if args.mode is None:  # bench: training a batch of 64 on a CPU takes several times an inference pass
        args.mode = "both" if args.device.type == "cuda" else "inference"
    args.modes = list(profiling.MODES) if args.mode == "both" else [args.mode]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cct-kernels` and `python -m cct_kernels`; returns the exit status (2: a bad flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = _command_line(argv)
    if hasattr(args, "out"):
        args.out = writable_folder(args.parser, args.out)
    if args.command in ("bench", "profile"):
        _resolve_bench_arguments(args)
    if args.command == "profile" and args.by == "kernels" and args.device.type != "cuda":
        args.parser.error(f"argument --by: 'kernels' ranks CUDA kernels and needs a CUDA device, got --device "
                          f"{args.device}; use --by ops")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
