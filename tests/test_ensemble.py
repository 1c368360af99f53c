"""The fused ensemble computes exactly what M separate networks would, for every architecture."""

import pytest
import torch

from training.forde import member_input_gradients
from training.models import ARCHITECTURES, build_ensemble, member_state_dict

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 12, 12), "resnet18": (3, 32, 32), "preact_resnet18": (3, 32, 32)}


def test_every_architecture_has_a_test_shape():
    assert set(SHAPES) == set(ARCHITECTURES)


# The ResNets take seconds each in float64: the full suite runs them, the fast tier the small archs.
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if "resnet" in a else a for a in ARCHITECTURES]


def _pair(arch, members=3):
    torch.manual_seed(0)
    shape = SHAPES[arch]
    mean, std = [0.5] * shape[0], [2.0] * shape[0]
    fused = build_ensemble(arch, members, shape, 5, mean, std, width=8).double()
    singles = []
    for m in range(members):
        single = build_ensemble(arch, 1, shape, 5, mean, std, width=8).double()
        single.load_state_dict(member_state_dict(fused, m))
        singles.append(single)
    return fused, singles, torch.randn(4, *shape, dtype=torch.float64)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_fused_matches_separate_members(arch, train_mode):
    fused, singles, x = _pair(arch)
    for model in [fused, *singles]:
        model.train(train_mode)
    logits = fused(x)
    assert logits.shape == (4, 3, 5)
    for m, single in enumerate(singles):
        torch.testing.assert_close(logits[:, m], single(x)[:, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_member_gets_its_own_input_gradient(arch):
    fused, singles, x = _pair(arch)
    fused.eval()
    targets = torch.tensor([0, 1, 2, 3])
    _, grads = member_input_gradients(fused, fused.normalize(x), targets)
    assert grads.shape == (4, 3, *SHAPES[arch])
    for m, single in enumerate(singles):
        single.eval()
        z = single.normalize(x).requires_grad_(True)
        logit = single.forward_members(z.unsqueeze(1)).squeeze(1).gather(1, targets[:, None]).sum()
        (expected,) = torch.autograd.grad(logit, z)
        torch.testing.assert_close(grads[:, m], expected, rtol=1e-8, atol=1e-10)


def test_batch_norm_keeps_statistics_per_member():
    fused, _, x = _pair("resnet18", members=2)
    fused.train()
    fused(x)
    bn = fused.body[2]
    assert bn.running_mean.shape == (2, 64)
    assert not torch.allclose(bn.running_mean[0], bn.running_mean[1])


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="model.arch: expected one of mlp, cnn"):
        build_ensemble("vgg", 2, (1, 8, 8), 10, [0.0], [1.0])
