"""Time per training step: FoRDE vs DE, and the fused ensemble vs a Python loop over members.

Prints one JSON object. All variants run interleaved in the same rounds (after warm-up)
and each figure is the median over rounds, so the ratios hold on a noisy machine.

    python benchmarks/bench_training.py                       # digits-sized CNN, M = 8, batch 128
    python benchmarks/bench_training.py --arch resnet18 --input-shape 3 32 32 --members 10 --device cuda
    python benchmarks/bench_training.py --arch torchvision:mobilenet_v3_small --kwargs '{"width_mult": 0.5}' \\
        --input-shape 3 32 32 --members 4 --batch 64
    python benchmarks/bench_training.py --suite torchvision [--device cuda]   # resnet18 + mobilenet_v3_small, M = 4

Any torchvision classifier (`--arch torchvision:NAME`) is fused by the same pass as the built-ins;
the loop runs the same members as separate networks.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn

from training.models import Ensemble, build_ensemble, member_state_dict
from training.trainer import Repulsion, loss_terms, resolve_device


class _MemberLoop(nn.Module):
    """The same members as separate networks, run one after another (what the fused ensemble replaces)."""

    def __init__(self, fused: Ensemble, singles: list[Ensemble]):
        super().__init__()
        self.singles = nn.ModuleList(singles)
        self.members, self.normalize = len(singles), fused.normalize

    def forward_members(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([single.forward_members(z[:, m : m + 1]) for m, single in enumerate(self.singles)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x).unsqueeze(1)
        return torch.cat([single.forward_members(z) for single in self.singles], dim=1)


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repulsion: Repulsion | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        ce, r, _ = loss_terms(model, x, y, repulsion)
        optimizer.zero_grad(set_to_none=True)
        (ce if r is None else ce + r).backward()
        optimizer.step()

    return step


def _time_ms(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


# `--suite torchvision`: fused vs loop of copies for two torchvision families at M = 4, CIFAR-sized.
_TORCHVISION_SUITE = [
    {"arch": "torchvision:resnet18", "kwargs": {}},
    {"arch": "torchvision:mobilenet_v3_small", "kwargs": {}},
]


def _measure(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    shape = tuple(args.input_shape)
    channels = shape[0]
    options = {"width": args.width, "kwargs": args.kwargs}
    fused = build_ensemble(
        args.arch, args.members, shape, args.classes, [0.0] * channels, [1.0] * channels, **options
    ).to(device)
    singles = []
    for m in range(args.members):
        single = build_ensemble(args.arch, 1, shape, args.classes, [0.0] * channels, [1.0] * channels, **options)
        single.load_state_dict(member_state_dict(fused, m))
        singles.append(single.to(device))
    loop = _MemberLoop(fused, singles).to(device)

    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    repulsion = Repulsion(None, None, 1e-12, None)
    variants = {
        "forde": _step_fn(fused, x, y, repulsion),
        "de": _step_fn(fused, x, y, None),
        "forde_loop": _step_fn(loop, x, y, repulsion),
    }
    for _ in range(args.warmup):
        for step in variants.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            times[name].append(_time_ms(step, device))
    median = {name: statistics.median(values) for name, values in times.items()}

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    )
    details = (
        f"(width={args.width})" if args.arch in ("mlp", "cnn") else (json.dumps(args.kwargs) if args.kwargs else "")
    )
    return {
        "device": device_name,
        "model": f"{args.arch}{details} on {'x'.join(map(str, shape))}",
        "members": args.members,
        "batch": args.batch,
        "forde_step_ms": round(median["forde"], 3),
        "de_step_ms": round(median["de"], 3),
        "forde_over_de": round(median["forde"] / median["de"], 3),
        "vectorized_step_ms": round(median["forde"], 3),  # the FoRDE step, fused
        "loop_step_ms": round(median["forde_loop"], 3),  # the same FoRDE step, one member at a time
        "loop_over_vectorized": round(median["forde_loop"] / median["forde"], 3),
        "rounds": args.rounds,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", help="mlp | cnn | resnet18 | preact_resnet18 | torchvision:NAME")
    parser.add_argument("--kwargs", type=json.loads, default={}, help="torchvision builder kwargs, as JSON")
    parser.add_argument("--width", type=int, default=16, help="cnn/mlp width (the digits quickstart uses 16)")
    parser.add_argument("--input-shape", type=int, nargs="+", default=[1, 8, 8], help="C H W of one input")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, help="inputs per step (default 128; 64 with --suite)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--suite",
        choices=["torchvision"],
        help="torchvision: fused vs loop for torchvision:resnet18 and torchvision:mobilenet_v3_small at M = 4 "
        "on 3x32x32 (batch 64 unless --batch is given); prints a JSON list",
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.suite is None:
        args.batch = args.batch or 128
        print(json.dumps(_measure(args, device), indent=2))
        return
    batch = args.batch or 64
    results = []
    for setting in _TORCHVISION_SUITE:
        run = copy.copy(args)
        run.arch, run.kwargs, run.members, run.input_shape, run.batch = (
            setting["arch"],
            setting["kwargs"],
            4,
            [3, 32, 32],
            batch,
        )
        results.append(_measure(run, device))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
