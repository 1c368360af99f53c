"""Time per training step: FoRDE vs DE, and the fused ensemble vs a Python loop over members.

Prints one JSON object. All variants run interleaved in the same rounds (after warm-up)
and each figure is the median over rounds, so the ratios hold on a noisy machine.

    python benchmarks/bench_training.py                       # digits-sized CNN, M = 8, batch 128
    python benchmarks/bench_training.py --arch resnet18 --input-shape 3 32 32 --members 10 --device cuda
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", help="mlp | cnn | resnet18 | preact_resnet18")
    parser.add_argument("--width", type=int, default=16, help="cnn/mlp width (the digits quickstart uses 16)")
    parser.add_argument("--input-shape", type=int, nargs="+", default=[1, 8, 8], help="C H W of one input")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    shape = tuple(args.input_shape)
    channels = shape[0]
    fused = build_ensemble(
        args.arch, args.members, shape, args.classes, [0.0] * channels, [1.0] * channels, width=args.width
    ).to(device)
    singles = []
    for m in range(args.members):
        single = build_ensemble(args.arch, 1, shape, args.classes, [0.0] * channels, [1.0] * channels, width=args.width)
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
    print(
        json.dumps(
            {
                "device": device_name,
                "model": f"{args.arch}{'' if args.arch.startswith(('resnet', 'preact')) else f'(width={args.width})'} "
                f"on {'x'.join(map(str, shape))}",
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
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
