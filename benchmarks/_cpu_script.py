"""The command line shared by the CPU measurement scripts (cpu_interference.py, cpu_packed_linear.py)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from cct_kernels.cli_bench import device_name


def run(doc: str, default_rounds: int, measure: Callable[[str, int, int], dict], show: Callable[[dict], None]):
    """Parses --model (default cct_14_7x2_224), --batch (1), --rounds and --out; runs measure(model, batch, rounds)
    (the result's fields), prints them with show(result) and writes the result, with the machine, as JSON to --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="cct_14_7x2_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=default_rounds)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"model": args.model, "batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), **measure(args.model, args.batch, args.rounds)}
    show(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
