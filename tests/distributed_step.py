"""One FoRDE training step, run by the equivalence test in one process and under torchrun.

    torchrun --standalone --nproc_per_node=2 tests/distributed_step.py ARCH OUT.safetensors

Rank 0 writes the global CE, R and every parameter and buffer after the step to OUT.
"""

import sys

import torch

from training.distributed import SINGLE, all_sum, init_world
from training.forde import lengthscale_scales, pca_basis
from training.models import build_ensemble
from training.trainer import Repulsion, train_step

GLOBAL_BATCH = 13  # odd on purpose: shards of 7 and 6 rows


def one_step(arch: str, world=SINGLE) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ensemble = build_ensemble(arch, 2, (1, 8, 8), 10, [6.0], [5.0], width=4)
    x = torch.rand(GLOBAL_BATCH, 1, 8, 8) * 16
    y = torch.randint(0, 10, (GLOBAL_BATCH,))
    pca = pca_basis(ensemble.normalize(torch.rand(200, 1, 8, 8) * 16))
    repulsion = Repulsion(pca.eigenvectors, lengthscale_scales("pca", pca.eigenvalues), 1e-12, None)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ensemble.train()
    ce, r, _ = train_step(ensemble, optimizer, x, y, repulsion, world)
    (ce_total,) = all_sum([ce.item()], world)
    state = {f"state/{k}": v.detach().clone() for k, v in ensemble.state_dict().items()}
    return state | {"ce": torch.tensor(ce_total, dtype=torch.float64), "repulsion": r.detach().double()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    world, _ = init_world("cpu")
    result = one_step(sys.argv[1], world)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in result.items()}, sys.argv[2])
    # Both ranks reach the end before either tears the group down: a rank that destroys it while its peer
    # is still connected can make Gloo's thread in the peer abort ("terminate called without an active
    # exception", seen once in CI), as the trainer's own barrier before teardown avoids.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
