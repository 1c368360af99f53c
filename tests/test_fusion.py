"""The fusion pass on its own: what it swaps, what it refuses and why, and the pieces it is built from."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, ModelConfig
from training.export.graphs import _adaptive_avg_pool2d_backward, _adaptive_max_pool2d_backward, _avg_pool2d_backward
from training.models import FusionError, ModelError, build_ensemble, build_member, ensemble_of
from training.models.fuse import fold_members, fuse_members
from training.models.layers import (
    FusedConv2d,
    FusedStochasticDepth,
    TwiceDifferentiableHardsigmoid,
    TwiceDifferentiableHardswish,
)

aten = torch.ops.aten


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_activations_equal_pytorchs_exactly(dtype):
    # every float32 step around the kinks at -3 and 3, and a wide sweep
    kinks = torch.cat([torch.linspace(k - 1e-3, k + 1e-3, 20001, dtype=dtype) for k in (-3.0, 3.0)])
    x = torch.cat([kinks, torch.linspace(-10, 10, 200001, dtype=dtype)])
    assert torch.equal(TwiceDifferentiableHardsigmoid()(x), nn.Hardsigmoid()(x))
    assert torch.equal(TwiceDifferentiableHardswish()(x), nn.Hardswish()(x))


def test_hard_activations_are_differentiable_twice():
    x = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)
    for module in (TwiceDifferentiableHardsigmoid(), TwiceDifferentiableHardswish()):
        (g,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        assert gg.abs().sum() > 0
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):  # why they are swapped in
        (g,) = torch.autograd.grad(F.hardsigmoid(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        self.mixer = nn.Sequential(nn.ReLU(), nn.Embedding(10, 8))

    def forward(self, x):
        return self.mixer(self.features(x))


def test_unsupported_module_names_path_type_and_what_is_supported():
    with pytest.raises(FusionError) as err:
        fuse_members([_WithAttention(), _WithAttention()])
    message = str(err.value)
    assert "'mixer.1' (Embedding)" in message
    assert "Conv2d" in message and "BatchNorm1d/2d/3d" in message and "LayerNorm" in message


class _OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) * self.scale


def test_container_with_its_own_parameters_is_refused():
    with pytest.raises(
        FusionError,
        match=r"cannot fuse the model itself \(.*_OwnParameter\): a container with "
        r"parameters or buffers of its own \(scale\)",
    ):
        fuse_members([_OwnParameter(), _OwnParameter()])


class _ConcatBlock(nn.Module):
    """A DenseNet-style block: concatenates its input and output over channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], dim=1)


class _Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dense = _ConcatBlock()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.dense(self.stem(x)))


def test_a_forward_that_mixes_members_is_caught_and_named():
    torch.manual_seed(0)
    with pytest.raises(FusionError) as err:
        ensemble_of([_Mixing(), _Mixing()], (3, 8, 8), 5, [0.0] * 3, [1.0] * 3)
    message = str(err.value)
    assert "mixes channels across members" in message
    assert "'dense' (" in message and "_ConcatBlock" in message


class _FixedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        return self.linear(self.conv(x).reshape(len(x), 8))  # one member's 2 x 2 x 2 features


def test_a_forward_that_assumes_one_members_width_is_named():
    with pytest.raises(
        FusionError,
        match=r"the fused members cannot run \(shape '\[2, 8\]' is invalid.*assumes one "
        "member's channel count",
    ):
        ensemble_of([_FixedReshape(), _FixedReshape()], (3, 2, 2), 5, [0.0] * 3, [1.0] * 3)


def test_a_channel_shuffle_is_caught():
    with pytest.raises(FusionError, match="mixes channels across members"):
        build_ensemble("torchvision:shufflenet_v2_x0_5", 2, (3, 32, 32), 5, [0.0] * 3, [1.0] * 3)


def test_members_of_different_architectures_are_refused():
    with pytest.raises(FusionError, match="member 1 differs at '0'"):
        fuse_members([nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Conv2d(3, 3, 1))])


def test_member_states_stack_and_unstack():
    torch.manual_seed(0)
    copies = [build_member("torchvision:mobilenet_v3_small", (3, 32, 32), 4, kwargs={"width_mult": 0.25})]
    copies.append(build_member("torchvision:mobilenet_v3_small", (3, 32, 32), 4, kwargs={"width_mult": 0.25}))
    fused = fuse_members(copies)
    state = fused.state_dict()
    assert list(state) == list(copies[0].state_dict())  # same keys, same order
    for m, member in enumerate(copies):
        for key, value in member.state_dict().items():
            assert torch.equal(state[key][m], value), key
    # and M plain state dicts stack into the fused one
    stacked = {key: torch.stack([c.state_dict()[key] for c in copies]) for key in state}
    fused.load_state_dict(stacked)


def test_grouped_dilated_reflect_convolutions_keep_their_groups():
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect") for _ in range(3)]
    fused = FusedConv2d(convs)
    assert fused.weight.shape == (3, 6, 2, 3, 3)
    x = torch.randn(2, 4, 9, 9)
    want = torch.cat([conv(x) for conv in convs], dim=1)
    torch.testing.assert_close(fused(fold_members(x, 3)), want)


def test_stochastic_depth_drops_per_input_and_member():
    torch.manual_seed(0)
    layer = FusedStochasticDepth(members=4, p=0.5, mode="row").train()
    out = layer(torch.ones(64, 4 * 3, 2, 2)).unflatten(1, (4, 3))  # [batch, members, C, H, W]
    per_block = out.flatten(2)
    assert ((per_block == 0) | (per_block == 2)).all()  # kept branches are scaled by 1 / (1 - p)
    assert (per_block == per_block[..., :1]).all()  # one decision per (input, member)
    decisions = per_block[..., 0]
    assert (decisions[:, 0] != decisions[:, 1]).any() and (decisions[0] != decisions[1]).any()
    batch = FusedStochasticDepth(members=4, p=0.5, mode="batch").train()
    decided = batch(torch.ones(8, 12)).unflatten(1, (4, 3))
    assert (decided == decided[:1, :, :1]).all()  # one decision per member, for the whole batch
    assert torch.equal(layer.eval()(torch.ones(2, 12)), torch.ones(2, 12))


def test_pooling_backward_decompositions_equal_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    for kernel, stride, padding, ceil, include, divisor in itertools.product(
        [(2, 2), (3, 2)], [[], [2, 2], [1, 3]], [0, 1], [False, True], [False, True], [None, 5]
    ):
        out = F.avg_pool2d(x, kernel, stride or None, padding, ceil, include, divisor)
        grad = torch.randn_like(out)
        args = (list(kernel), stride, [padding, padding], ceil, include, divisor)
        want = aten.avg_pool2d_backward(grad, x, *args)
        torch.testing.assert_close(_avg_pool2d_backward(grad, x, *args), want, rtol=0, atol=1e-14)
    for size in [(1, 1), (3, 5), (5, 7), (11, 13)]:
        grad = torch.randn(2, 3, *size, dtype=torch.float64)
        want = aten._adaptive_avg_pool2d_backward(grad, x)
        torch.testing.assert_close(_adaptive_avg_pool2d_backward(grad, x), want, rtol=0, atol=1e-14)
        _, indices = F.adaptive_max_pool2d(x, size, return_indices=True)
        want = aten.adaptive_max_pool2d_backward(grad, x, indices)
        torch.testing.assert_close(_adaptive_max_pool2d_backward(grad, x, indices), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "model,message",
    [
        (
            {"arch": "torchvision:resnet81"},
            "'resnet81' is not a torchvision classifier (close matches: torchvision:resnet18",
        ),
        (
            {"arch": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}},
            "model.kwargs.weights: nothing is downloaded",
        ),
        ({"arch": "torchvision:resnet18", "kwargs": {"num_classes": 3}}, "model.kwargs.num_classes: the class count"),
        ({"arch": "cnn", "kwargs": {"dropout": 0.1}}, "model.kwargs: the built-in 'cnn' takes model.width"),
        ({"factory": "not a spec"}, 'model.factory: expected "package.module:function"'),
        ({"arch": "cnn", "factory": "a.b:c"}, 'model.arch must be "factory"'),
        ({"arch": "factory"}, 'model.arch "factory" needs model.factory'),
        ({"init": "weights.bin"}, "model.init: expected a .safetensors, .pt or .pth file"),
    ],
)
def test_model_config_is_checked_at_load(model, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**model)
    assert message in str(err.value)


def test_factory_alone_sets_the_arch():
    assert ModelConfig(factory="a.b:c").arch == "factory"


def test_model_errors_reach_the_config_error(tmp_path):
    from training.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('[model]\narch = "torchvision:mobilenetv2"\n')
    with pytest.raises(ConfigError, match=r"c.toml: model.arch: 'mobilenetv2' is not a torchvision classifier"):
        load_config(path)


def test_unknown_builder_kwargs_are_named():
    with pytest.raises(ModelError, match="model.kwargs: torchvision mobilenet_v2 refused"):
        build_member("torchvision:mobilenet_v2", (3, 32, 32), 5, kwargs={"width_multiplier": 0.5})


def test_a_member_too_small_for_its_input_is_named():
    with pytest.raises(FusionError, match=r"a member cannot run on inputs of shape \[1, 1, 1\]"):
        build_ensemble("cnn", 2, (1, 1, 1), 5, [0.0], [1.0], width=4)


SMALL = {"width_mult": 0.25}


def _saved_member(path, classes):
    torch.manual_seed(1)
    member = build_member("torchvision:mobilenet_v3_small", (3, 32, 32), classes, kwargs=SMALL)
    state = member.state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_init_starts_every_member_from_the_file_with_its_own_new_head(tmp_path, suffix):
    saved = _saved_member(tmp_path / f"w{suffix}", classes=10)
    ensemble = build_ensemble(
        "torchvision:mobilenet_v3_small",
        3,
        (3, 32, 32),
        4,
        [0.0] * 3,
        [1.0] * 3,
        kwargs=SMALL,
        init=tmp_path / f"w{suffix}",
    )
    state = ensemble.body.state_dict()
    head = "classifier.3.weight"
    for key, value in saved.items():
        if key.startswith("classifier.3."):
            assert state[key].shape[1] == 4  # re-initialised for 4 classes
            continue
        for m in range(3):
            assert torch.equal(state[key][m], value), key
    assert not torch.equal(state[head][0], state[head][1])  # each member its own head


def test_init_with_the_same_class_count_loads_the_head_too(tmp_path):
    saved = _saved_member(tmp_path / "w.pt", classes=4)
    ensemble = build_ensemble(
        "torchvision:mobilenet_v3_small", 2, (3, 32, 32), 4, [0.0] * 3, [1.0] * 3, kwargs=SMALL, init=tmp_path / "w.pt"
    )
    assert torch.equal(ensemble.body.state_dict()["classifier.3.weight"][1], saved["classifier.3.weight"])


def test_init_of_another_architecture_names_the_file_and_key(tmp_path):
    path = tmp_path / "other.safetensors"
    _saved_member(path, classes=10)
    with pytest.raises(
        ModelError,
        match=r"other.safetensors: key 'features.0.0.weight' has shape \[8, 3, 3, 3\], "
        r"torchvision:mobilenet_v3_small expects \[16, 3, 3, 3\]",
    ):
        build_ensemble("torchvision:mobilenet_v3_small", 2, (3, 32, 32), 4, [0.0] * 3, [1.0] * 3, init=path)
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(ModelError, match="wrapped.pt holds a dict with keys .* expected a state dict"):
        build_ensemble("cnn", 2, (1, 8, 8), 4, [0.0], [1.0], init=tmp_path / "wrapped.pt")


# sha256 of the state dict (and of the random state after it), seed 0, M = 3, width 16: pinned from
# the fused layers that preceded the fusion pass (commit 2eb05e2), so a seed still gives the same run.
BUILTIN_INIT = {
    "mlp": ((1, 8, 8), "82aa385b8f1b4d2c"),
    "cnn": ((1, 8, 8), "dcd59e440626a8a2"),
    "resnet18": ((3, 32, 32), "92a29a92d90bc61d"),
    "preact_resnet18": ((3, 32, 32), "c5859df06d77cf19"),
}


@pytest.mark.parametrize("arch", BUILTIN_INIT)
def test_builtins_initialise_bit_for_bit_as_before(arch):
    import hashlib

    shape, pinned = BUILTIN_INIT[arch]
    torch.manual_seed(0)
    state = build_ensemble(arch, 3, shape, 10, [0.0] * shape[0], [1.0] * shape[0], width=16).state_dict()
    digest = hashlib.sha256()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):  # new since then
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
    digest.update(torch.rand(5).numpy().tobytes())
    assert digest.hexdigest()[:16] == pinned
