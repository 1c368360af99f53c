"""The FoRDE repulsion term against values worked out by hand, and its gradient flow."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training import run as run_files
from training import trainer
from training.config import TrainConfig
from training.forde import PCA_MAX_INPUT_SIZE, PCABasis, lengthscale_scales, pca_basis, repulsion_term
from training.models import build_ensemble
from training.trainer import Repulsion, TrainingError, loss_terms


def test_two_orthogonal_members_by_hand():
    # s1 = [1, 0], s2 = [0, 1]: D_12 = D_21 = 2, D_ii = 0. numpy's median of {0, 2} is 1
    # (torch.median would give 0), so h = 1 / ln 2 and each member's term is
    # log(exp(0) + exp(-2 ln 2)) = log(1.25).
    grads = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert repulsion_term(grads).item() == pytest.approx(2 * math.log(1.25), rel=1e-9)


def test_three_members_by_hand():
    # s1 = [1, 0], s2 = [0, 1], s3 = [1, 1]/sqrt(2): D_12 = 2, D_13 = D_23 = 2 - sqrt(2).
    # Every column's median over i is 2 - sqrt(2), so h = (2 - sqrt(2)) / ln 3 and
    # R = 2 log(1 + 1/3 + 3^(-2 / (2 - sqrt(2)))) + log(1 + 1/3 + 1/3).
    grads = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[3.0, 3.0]]], dtype=torch.float64)
    expected = 2 * math.log(4 / 3 + 3 ** (-2 / (2 - math.sqrt(2)))) + math.log(5 / 3)
    assert repulsion_term(grads).item() == pytest.approx(expected, rel=1e-9)


def test_gradient_norm_does_not_matter_but_scales_do():
    grads = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[3.0, 3.0]]], dtype=torch.float64)
    assert repulsion_term(grads * 7.5).item() == pytest.approx(repulsion_term(grads).item(), rel=1e-9)
    # Scales [2, 1]: s~1 = [2, 0], s~2 = [0, 1], s~3 = [sqrt 2, 1/sqrt 2].
    s = np.array([[2.0, 0.0], [0.0, 1.0], [math.sqrt(2), 1 / math.sqrt(2)]])
    d = ((s[:, None] - s[None]) ** 2).sum(-1)
    h = np.median(d, axis=0) / math.log(3)
    expected = sum(math.log(np.exp(-d[i] / h).sum()) for i in range(3))
    scaled = repulsion_term(grads, scales=torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert scaled.item() == pytest.approx(expected, rel=1e-9)
    assert scaled.item() != pytest.approx(repulsion_term(grads).item(), rel=1e-3)


def _reference(grads, basis=None, scales=None, eps=1e-12, stop_gradient=True):
    """Direct transcription of DESIGN.md section 3 with explicit loops (slow, obvious)."""
    members, batch, _ = grads.shape
    u = grads if basis is None else grads @ basis
    s = u / torch.sqrt((u**2).sum(-1, keepdim=True) + eps)
    if scales is not None:
        s = s * scales
    second = s.detach() if stop_gradient else s
    d = torch.stack(
        [torch.stack([((s[i] - second[j]) ** 2).sum(-1) for j in range(members)]) for i in range(members)]
    )  # [i, j, b]
    h = torch.from_numpy(np.median(d.detach().numpy(), axis=0)) / math.log(members) + 1e-12
    total = 0.0
    for i in range(members):
        total = total + torch.logsumexp((-d[i] / h).flatten(), 0) - math.log(batch)
    return total / batch


@pytest.mark.parametrize("members,batch", [(2, 1), (3, 4), (4, 5)])
def test_matches_reference_with_pca_basis_and_gradients(members, batch):
    torch.manual_seed(members * 10 + batch)
    grads = torch.randn(members, batch, 6, dtype=torch.float64, requires_grad=True)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    scales = torch.rand(6, dtype=torch.float64) + 0.5
    ours = repulsion_term(grads, basis, scales)
    ref = _reference(grads, basis, scales)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    (g_ours,) = torch.autograd.grad(ours, grads)
    (g_ref,) = torch.autograd.grad(ref, grads)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-10)


def test_second_argument_carries_no_gradient():
    torch.manual_seed(0)
    grads = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(repulsion_term(grads), grads)
    (with_stop,) = torch.autograd.grad(_reference(grads), grads)
    (without_stop,) = torch.autograd.grad(_reference(grads, stop_gradient=False), grads)
    torch.testing.assert_close(ours, with_stop)
    assert not torch.allclose(ours, without_stop, rtol=1e-3, atol=1e-6)


def test_gradient_is_the_wgd_repulsion_force():
    # d R / d s_i = (1/B) sum_j grad k_ij / sum_j k_ij with k_ij = (1/B) sum_b exp(-D_ijb / h_jb).
    torch.manual_seed(1)
    grads = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(repulsion_term(grads), grads)
    members, batch = 3, 2
    for i in range(members):
        own = grads[i].detach().clone().requires_grad_(True)
        s_i = own / own.norm(dim=-1, keepdim=True)
        s = (grads / grads.norm(dim=-1, keepdim=True)).detach()
        d_all = ((s[:, None] - s[None]) ** 2).sum(-1)
        h = torch.from_numpy(np.median(d_all.numpy(), axis=0)) / math.log(members)
        k = torch.stack([torch.exp(-((s_i - s[j]) ** 2).sum(-1) / h[j]).mean() for j in range(members)])
        (force,) = torch.autograd.grad(torch.log(k.sum()), own)
        torch.testing.assert_close(ours[i], force / batch, rtol=1e-7, atol=1e-12)


def test_zero_gradients_stay_finite():
    grads = torch.zeros(3, 2, 4, requires_grad=True)
    value = repulsion_term(grads)
    (g,) = torch.autograd.grad(value, grads)
    assert torch.isfinite(value) and torch.isfinite(g).all()


def test_every_member_receives_repulsion_gradients():
    torch.manual_seed(0)
    ensemble = build_ensemble("cnn", 3, (1, 8, 8), 10, [0.0], [1.0], width=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, r, _ = loss_terms(ensemble, x, y, Repulsion(None, None, 1e-12, None))
    r.backward()
    first_conv = ensemble.body[1].weight.grad  # [M, out, in, k, k]
    per_member = first_conv.flatten(1).abs().sum(1)
    assert (per_member > 0).all(), per_member


def test_subset_uses_only_the_first_inputs():
    torch.manual_seed(0)
    ensemble = build_ensemble("mlp", 3, (1, 8, 8), 10, [0.0], [1.0], width=8)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _, r_sub, bandwidth = loss_terms(ensemble, x, y, Repulsion(None, None, 1e-12, 4))
    _, r_first, _ = loss_terms(ensemble, x[:4], y[:4], Repulsion(None, None, 1e-12, None))
    assert bandwidth.shape == (3, 4)
    assert r_sub.item() == pytest.approx(r_first.item(), rel=1e-6)


def test_pca_basis_and_lengthscales():
    torch.manual_seed(0)
    z = torch.randn(500, 1, 2, 2) * torch.tensor([3.0, 1.0, 0.5, 0.0]).view(1, 1, 2, 2)
    pca = pca_basis(z)
    assert pca.eigenvalues[0] == pytest.approx(9.0, rel=0.2)
    assert pca.eigenvalues[-1] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(pca.eigenvectors.T @ pca.eigenvectors, torch.eye(4), atol=1e-5, rtol=0)
    lam = pca.eigenvalues
    torch.testing.assert_close(lengthscale_scales("pca", lam), lam.sqrt())
    assert lengthscale_scales("identity", lam) is None
    torch.testing.assert_close(lengthscale_scales("tuned", lam, alpha=1.0), lam.sqrt(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lengthscale_scales("tuned", lam, alpha=0.0), torch.ones(4))
    tuned = lengthscale_scales("tuned", lam, alpha=0.5)
    torch.testing.assert_close(tuned, torch.sqrt(1 / (0.5 / lam.clamp_min(1e-12) + 0.5)))


def test_forde_config_needs_two_members():
    with pytest.raises(ValueError, match="at least 2"):
        TrainConfig.model_validate({"ensemble": {"method": "forde", "members": 1}})


def test_strength_scales_only_the_repulsion_in_the_step():
    from training.trainer import train_step

    def update(strength):
        torch.manual_seed(0)
        ensemble = build_ensemble("mlp", 3, (1, 8, 8), 10, [0.0], [1.0], width=8)
        before = [p.detach().clone() for p in ensemble.parameters()]
        optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.1)
        x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
        train_step(ensemble, optimizer, x, y, Repulsion(None, None, 1e-12, None, strength))
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(ensemble.parameters(), before, strict=True)])

    # Plain SGD: the update is linear in the strength, and the repulsion's part is not zero.
    step0, step1, step2 = update(0.0), update(1.0), update(2.0)
    repulsion_part = step1 - step0
    assert repulsion_part.abs().max() > 1e-5  # well above float32 rounding of the updates (~3e-8)
    torch.testing.assert_close(step2 - step1, repulsion_part, rtol=1e-3, atol=1e-7)


def test_pca_basis_is_the_uncentred_second_moment_by_hand():
    # X = [[1, 0], [0, 2], [1, 0], [0, 2]]: X^T X / (n - 1) = [[2, 0], [0, 8]] / 3, eigenvalues 8/3 and 2/3
    # along e2 and e1. Centred first (mean [0.5, 1]): [[1, -2], [-2, 4]] / 3, eigenvalues 5/3 and 0,
    # the first along [1, -2] / sqrt 5.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0]])
    uncentred, centred = pca_basis(x.view(4, 1, 1, 2)), pca_basis(x.view(4, 1, 1, 2), centred=True)
    torch.testing.assert_close(uncentred.eigenvalues, torch.tensor([8 / 3, 2 / 3]))
    torch.testing.assert_close(uncentred.eigenvectors.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert not uncentred.centred and centred.centred
    torch.testing.assert_close(centred.eigenvalues, torch.tensor([5 / 3, 0.0]), atol=1e-6, rtol=1e-6)
    first = centred.eigenvectors[:, 0] * torch.sign(centred.eigenvectors[0, 0])
    torch.testing.assert_close(first, torch.tensor([1.0, -2.0]) / math.sqrt(5))


def test_pca_basis_matches_numpy_eigh_of_the_second_moment():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[2.0, -1.0, 0.5, 0.0, 3.0, 1.0], scale=[1.0, 2.0, 0.5, 1.5, 0.3, 1.0], size=(50, 6))
    values, vectors = np.linalg.eigh(x.T @ x / (len(x) - 1))
    values, vectors = values[::-1], vectors[:, ::-1]
    # chunk=16 accumulates the matrix over several chunks, as for CIFAR-sized data
    pca = pca_basis(torch.tensor(x, dtype=torch.float32).view(50, 2, 3), chunk=16)
    np.testing.assert_allclose(pca.eigenvalues.numpy(), values, rtol=1e-5)
    np.testing.assert_allclose(np.abs(pca.eigenvectors.numpy().T @ vectors), np.eye(6), atol=1e-4)


def test_pca_and_pca_centred_differ_with_a_mean_and_agree_without():
    torch.manual_seed(0)
    z = torch.randn(400, 1, 2, 2) * torch.tensor([3.0, 1.0, 0.5, 0.2]).view(1, 1, 2, 2) + 2.0
    uncentred, centred = pca_basis(z), pca_basis(z, centred=True)
    # X^T X = Xc^T Xc + n mean mean^T, so the traces differ by n / (n - 1) ||mean||^2 (about 16 here).
    mean = z.flatten(1).double().mean(0)
    difference = uncentred.eigenvalues.double().sum() - centred.eigenvalues.double().sum()
    assert difference.item() == pytest.approx(400 / 399 * mean.pow(2).sum().item(), rel=1e-5)
    assert difference.item() > 15
    z = z - z.mean(0, keepdim=True)
    uncentred, centred = pca_basis(z), pca_basis(z, centred=True)
    torch.testing.assert_close(uncentred.eigenvalues, centred.eigenvalues, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((uncentred.eigenvectors.T @ centred.eigenvectors).abs(), torch.eye(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(lengthscale_scales("pca_centred", centred.eigenvalues), centred.eigenvalues.sqrt())


def test_pca_basis_refuses_inputs_over_the_size_limit():
    with pytest.raises(ValueError, match=f"{PCA_MAX_INPUT_SIZE + 1} x {PCA_MAX_INPUT_SIZE + 1}"):
        pca_basis(torch.zeros(2, PCA_MAX_INPUT_SIZE + 1))


def _tiny_digits(lengthscale: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "device": "cpu",
            "model": {"arch": "mlp", "width": 4, "depth": 1},
            "ensemble": {"method": "forde", "members": 2},
            "forde": {"lengthscale": lengthscale},
            "optim": {"epochs": 1},
        }
    )


@pytest.mark.parametrize("lengthscale", ["pca", "pca_centred", "tuned"])
def test_training_refuses_a_basis_too_large_before_any_epoch(tmp_path, monkeypatch, lengthscale):
    # The real trainer on digits (64 values per input) with the limit lowered to 32.
    monkeypatch.setattr(trainer, "PCA_MAX_INPUT_SIZE", 32)
    with pytest.raises(TrainingError, match=r"64 x 64 matrix.*limit of 32.*'identity'"):
        trainer.train(_tiny_digits(lengthscale), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / run_files.CHECKPOINT).exists() and not (tmp_path / "run" / run_files.PCA).exists()


def test_pca_record_round_trips(tmp_path):
    basis = PCABasis(torch.eye(3), torch.ones(3), centred=True)
    run_files.write_pca(tmp_path, basis)
    assert run_files.read_pca(tmp_path).centred
    run_files.write_pca(tmp_path, PCABasis(torch.eye(3), torch.ones(3)))
    assert not run_files.read_pca(tmp_path).centred


@pytest.mark.parametrize("written", ["centred", "legacy"])
def test_resume_refuses_a_basis_of_the_other_kind(tmp_path, written):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _tiny_digits("pca")
    (run_dir / run_files.CONFIG).write_text(config.to_json())
    tensors = {"eigenvectors": torch.eye(64), "eigenvalues": torch.ones(64)}
    if written == "centred":
        run_files.write_pca(run_dir, PCABasis(tensors["eigenvectors"], tensors["eigenvalues"], centred=True))
    else:  # a run folder from before the record: no metadata, and then every basis was centred
        save_file(tensors, str(run_dir / run_files.PCA))
    with pytest.raises(TrainingError, match=r"holds the centred PCA basis.*'pca' uses the uncentred.*'pca_centred'"):
        trainer.train(config, run_dir, resume=True, progress=False)


def test_config_accepts_pca_centred():
    assert TrainConfig.model_validate({"forde": {"lengthscale": "pca_centred"}}).forde.lengthscale == "pca_centred"
