"""Data-parallel scaling: the same training with 1, 2, ... processes (torchrun, Gloo on CPU / NCCL on GPU).

    python benchmarks/bench_distributed.py                                   # digits quickstart, 1 and 2 processes
    python benchmarks/bench_distributed.py training/configs/cifar10_resnet18.toml --nproc 1 2 4 8 --device cuda

Runs `forde train CONFIG --epochs E --nproc N` for each N, interleaved over rounds, and
reads the seconds of every epoch after the first from train_log.jsonl (the first carries
start-up). Prints one JSON object: median epoch seconds per N and the speed-up over 1 process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FORDE = str(Path(sys.executable).with_name("forde"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path, default=Path("training/configs/digits.toml"))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {n: [] for n in args.nproc}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for n in args.nproc:
                run = Path(tmp) / f"n{n}-r{round_}"
                subprocess.run(
                    [
                        FORDE,
                        "train",
                        str(args.config),
                        "--out",
                        str(run),
                        "--epochs",
                        str(args.epochs),
                        "--nproc",
                        str(n),
                        "--device",
                        args.device,
                        "--quiet",
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
                seconds[n] += [line["seconds"] for line in log[1:]]
    epoch = {n: round(statistics.median(s), 3) for n, s in seconds.items()}
    base = epoch[args.nproc[0]]
    print(
        json.dumps(
            {
                "device": f"{args.device} ({platform.machine()})",
                "config": str(args.config),
                "epochs": args.epochs,
                "rounds": args.rounds,
                "epoch_seconds": epoch,
                "speedup_over_first": {n: round(base / s, 3) for n, s in epoch.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
