"""The FoRDE repulsion: members pushed apart in the space of their input gradients.

Trinh, Heinonen, Acerbi, Kaski. "Input-gradient space particle inference for neural
network ensembles", ICLR 2024. The steps below follow DESIGN.md section 3; the
kernel is the paper's RBF on the unit sphere with diagonal lengthscales (its eq. for
kappa), the bandwidth the median heuristic of the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PCA_MAX_INPUT_SIZE",
    "PCABasis",
    "lengthscale_scales",
    "pca_basis",
    "repulsion_term",
    "repulsion_with_bandwidth",
    "member_input_gradients",
]


def repulsion_term(
    grads: torch.Tensor, basis: torch.Tensor | None = None, scales: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """The repulsion R of DESIGN.md section 3 step 7, differentiable with respect to `grads`.

    grads: `[M, B, D]` input gradients of the true-class logit, flattened.
    basis: `[D, K]` (PCA eigenvectors) or None for the identity.
    scales: `[K]`, square roots of the inverse squared lengthscales, or None for ones.

    With s~ the normalized, scaled gradients, D_ijb = ||s~_ib - stopgrad(s~_jb)||^2,
    h_jb = median_i stopgrad(D_ijb) / ln M, and
    R = (1/B) sum_i [logsumexp_(j,b)(-D_ijb / h_jb) - ln B].
    Its gradient with respect to member i is the WGD repulsion force
    sum_j grad k_ij / sum_j k_ij, with k_ij = (1/B) sum_b exp(-D_ijb / h_jb).
    """
    return repulsion_with_bandwidth(grads, basis, scales, eps)[0]


def repulsion_with_bandwidth(
    grads: torch.Tensor, basis: torch.Tensor | None = None, scales: torch.Tensor | None = None, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """`repulsion_term` and the bandwidths h `[M, B]` it used (detached), for logging."""
    members, batch = grads.shape[:2]
    u = grads if basis is None else grads @ basis  # [M, B, K]
    s = u / torch.sqrt(u.pow(2).sum(-1, keepdim=True) + eps)  # onto the unit sphere
    if scales is not None:
        s = s * scales
    s_fixed = s.detach()  # the second kernel argument carries no gradient
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b avoids materializing [M, M, B, K].
    sq_norm = s.pow(2).sum(-1)  # [M, B]
    distance = (
        sq_norm[:, None, :] + sq_norm.detach()[None, :, :] - 2.0 * torch.einsum("ibk,jbk->ijb", s, s_fixed)
    ).clamp_min(0.0)  # [i, j, b]
    # numpy's median (mean of the two middle values); torch.median would take the lower one.
    bandwidth = torch.quantile(distance.detach(), 0.5, dim=0) / math.log(members) + 1e-12  # [j, b]
    log_kernel = -distance / bandwidth  # [i, j, b]
    per_member = torch.logsumexp(log_kernel.flatten(1), dim=1) - math.log(batch)  # [i]
    return per_member.sum() / batch, bandwidth


def member_input_gradients(
    ensemble: torch.nn.Module, z: torch.Tensor, targets: torch.Tensor | None = None, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member logits and each member's gradient of its `targets` logit w.r.t. its normalized input.

    z: normalized inputs `[B, *input_shape]`; targets: `[B]` class indices, or None for the
    ensemble's predicted class. Returns logits `[B, M, C]` and gradients `[B, M, *input_shape]`.
    Each member gets its own copy of the input, so one backward yields all M gradients.
    With `create_graph` the gradients can be differentiated again (the FoRDE training step).
    """
    members = ensemble.members
    z_members = z.unsqueeze(1).repeat(1, members, *([1] * (z.dim() - 1))).requires_grad_(True)
    with torch.enable_grad():
        logits = ensemble.forward_members(z_members)
        if targets is None:
            targets = logits.detach().softmax(-1).mean(1).argmax(-1)
        target_logit = logits.gather(2, targets.view(-1, 1, 1).expand(-1, members, 1)).sum()
        (grads,) = torch.autograd.grad(target_logit, z_members, create_graph=create_graph)
    return logits, grads


# The largest flattened input size D for which a PCA basis is computed. The basis needs the D x D
# second-moment matrix in float64 and its full eigendecomposition (`torch.linalg.eigh`): memory
# 8 D^2 bytes per D x D copy (134 MB at 4096, with eigh's workspace and the eigenvector matrix a few
# of them) and time O(D^3), roughly 10 D^3 flops for eigenvalues plus eigenvectors (7e11 at 4096;
# at 3 x 64 x 64 = 12288, 27 times that and 1.2 GB per copy). The float32
# basis is also saved with the run (64 MB at 4096) and applied every step to the [M, B, D] gradients
# (M B D^2 flops). CIFAR's 3 x 32 x 32 = 3072 fits; larger inputs use identity lengthscales.
PCA_MAX_INPUT_SIZE = 4096


@dataclass(frozen=True)
class PCABasis:
    """Eigenvectors `[D, D]` (columns, by decreasing eigenvalue) and eigenvalues `[D]` of the second
    moment of the normalized training inputs: uncentred X^T X / (n - 1) as the reference computes it,
    or the covariance (the mean subtracted first) when `centred`."""

    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    centred: bool = False


def pca_basis(z: torch.Tensor, chunk: int = 4096, centred: bool = False) -> PCABasis:
    """PCA of normalized training inputs `[N, *input_shape]`, accumulated in chunks (CIFAR-sized N).

    With X the inputs flattened to `[N, D]`, the matrix decomposed is X^T X / (N - 1), uncentred, as
    the reference's `calculate_pca.py` computes it (the `pca` lengthscales); with `centred`,
    (X - mean)^T (X - mean) / (N - 1), the covariance (`pca_centred`). Refuses D > PCA_MAX_INPUT_SIZE.
    """
    flat = z.flatten(1)
    n, d = flat.shape
    if d > PCA_MAX_INPUT_SIZE:
        raise ValueError(
            f"a PCA basis of inputs with {d} values each needs a {d} x {d} eigendecomposition; "
            f"the limit is {PCA_MAX_INPUT_SIZE}"
        )
    mean = flat.double().mean(0) if centred else torch.zeros(d, dtype=torch.float64, device=flat.device)
    second_moment = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
    for start in range(0, n, chunk):
        rows = flat[start : start + chunk].double() - mean
        second_moment += rows.T @ rows
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment / max(n - 1, 1))
    order = torch.argsort(eigenvalues, descending=True)
    return PCABasis(
        eigenvectors[:, order].float().contiguous(), eigenvalues[order].clamp_min(0.0).float(), centred=centred
    )


def lengthscale_scales(mode: str, eigenvalues: torch.Tensor | None, alpha: float = 0.5) -> torch.Tensor | None:
    """Square roots of the inverse squared lengthscales, per basis coordinate.

    pca, pca_centred: sqrt(lambda_d) (of their own basis); identity: None (all ones);
    tuned: sqrt(1 / (alpha / lambda_d + 1 - alpha)).
    """
    if mode == "identity":
        return None
    if eigenvalues is None:
        raise ValueError(f"lengthscale mode {mode!r} needs the PCA eigenvalues")
    if mode in ("pca", "pca_centred"):
        return eigenvalues.sqrt()
    if mode == "tuned":
        # A zero-variance direction gets inverse lengthscale 0 (ignored), as alpha / lambda -> inf.
        inverse_sq = 1.0 / (alpha / eigenvalues.clamp_min(1e-12) + (1.0 - alpha))
        return inverse_sq.sqrt()
    raise ValueError(f"forde.lengthscale: expected pca, pca_centred, identity or tuned, got {mode!r}")
