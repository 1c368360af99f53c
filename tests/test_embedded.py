"""Embedded ensembles (BatchEnsemble, MC-dropout ensembles): the layers equal plain members with folded
weights, FoRDE's gradients flow through the shared weights and modulations as the chain rule says, the
optimizer steps as docs/design.md section 11 writes it, and the regimes at initialization."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.config import STRUCTURES, ConfigError, TrainConfig, load_config, with_overrides
from training.diversity import weight_cosine_similarity
from training.forde import member_input_gradients, repulsion_term
from training.models import (
    ARCHITECTURES,
    build_ensemble,
    build_member,
    folded_ensemble,
    member_state_dict,
    parameter_count,
)
from training.models.embedded import EmbeddedConv2d, EmbeddedLinear, embed_member, folded_copies
from training.models.fuse import fold_members
from training.optim import build_optimizer
from training.trainer import loss_terms

from helpers import ROOT

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 12, 12), "resnet18": (3, 16, 16), "preact_resnet18": (3, 16, 16)}
EMBEDDED = [s for s in STRUCTURES if s != "independent"]


def test_every_structure_has_tests():
    # independent members are tests/test_ensemble.py's; every other structure is parametrized here
    assert set(STRUCTURES) == {"independent", *EMBEDDED} and EMBEDDED == ["batchensemble", "mc_dropout"]
    assert set(SHAPES) == set(ARCHITECTURES)


def _embedded(arch, structure, members=3, init="normal", dtype=torch.float64):
    from training.config import EmbeddedConfig

    torch.manual_seed(0)
    shape = SHAPES[arch]
    config = EmbeddedConfig(init=init, keep_prob=0.6)
    ensemble = build_ensemble(
        arch, members, shape, 5, [0.5] * shape[0], [2.0] * shape[0], width=8, structure=structure, embedded=config
    )
    return ensemble.to(dtype), torch.randn(4, *shape, dtype=dtype)


def _plain(ensemble, arch, index):
    """Member `index` as a one-member independent ensemble of `arch` holding its folded weights."""
    shape = ensemble.input_shape
    single = build_ensemble(arch, 1, shape, 5, [0.5] * shape[0], [2.0] * shape[0], width=8).to(ensemble.mean.dtype)
    single.load_state_dict(member_state_dict(folded_ensemble(ensemble), index))
    return single


# The ResNets take seconds per case (11M parameters x 3 members in float64): slow tier.
_ARCHS = [a if "resnet" not in a else pytest.param(a, marks=pytest.mark.slow) for a in ARCHITECTURES]


@pytest.mark.parametrize("structure", EMBEDDED)
@pytest.mark.parametrize("arch", _ARCHS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_each_member_equals_a_plain_network_with_folded_weights(arch, structure, train_mode):
    ensemble, x = _embedded(arch, structure)
    singles = [_plain(ensemble, arch, m) for m in range(ensemble.members)]
    for model in (ensemble, *singles):
        model.train(train_mode)  # train mode: every member's batch-norm statistics are its own
    logits = ensemble(x)
    assert logits.shape == (4, 3, 5)
    for m, single in enumerate(singles):
        torch.testing.assert_close(logits[:, m], single(x)[:, 0], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the members are not one network


@pytest.mark.parametrize("structure", EMBEDDED)
def test_input_gradients_are_each_members_own(structure):
    ensemble, x = _embedded("cnn", structure)
    folded = folded_ensemble(ensemble).eval()
    ensemble.eval()
    targets = torch.tensor([0, 1, 2, 3])
    _, grads = member_input_gradients(ensemble, ensemble.normalize(x), targets)
    _, expected = member_input_gradients(folded, folded.normalize(x), targets)
    torch.testing.assert_close(grads, expected, rtol=1e-9, atol=1e-12)


def test_the_layers_are_batchensembles_rank_one_form():
    # y_a = ((x_a o r_a) W^T) o s_a + b_a, i.e. W_a = W o (r_a s_a^T), checked against the formula itself
    torch.manual_seed(1)
    linear = nn.Linear(6, 4).double()
    r, s = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    layer = EmbeddedLinear(linear, 3, in_scale=r.clone(), out_scale=s.clone())
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    y = layer(x.flatten(1)).unflatten(1, (3, 4))
    for a in range(3):
        weight = linear.weight * torch.outer(s[a], r[a])  # [out, in]
        torch.testing.assert_close(y[:, a], x[:, a] @ weight.T + linear.bias, rtol=1e-12, atol=1e-12)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    r, s = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    layer = EmbeddedConv2d(conv, 3, in_scale=r.clone(), out_scale=s.clone())
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    y = layer(x.flatten(1, 2)).unflatten(1, (3, 6))
    for a in range(3):
        plain = conv(x[:, a] * r[a].view(1, -1, 1, 1)) - conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y[:, a], plain * s[a].view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1))


def test_batchensemble_shares_one_set_of_weights():
    shape, mean, std = (1, 8, 8), [0.0], [1.0]
    torch.manual_seed(0)
    embedded = build_ensemble("cnn", 4, shape, 10, mean, std, width=16, structure="batchensemble")
    independent = build_ensemble("cnn", 4, shape, 10, mean, std, width=16)
    assert parameter_count(independent) == 4 * parameter_count(build_ensemble("cnn", 1, shape, 10, mean, std, width=16))
    # one network's weights W, and per member: r, s (every layer's in and out channels) and its biases
    layers = _layers(embedded)
    shared = sum(m.weight.numel() for m in layers)
    per_member = sum(m.in_scale.numel() + m.out_scale.numel() + m.bias.numel() for m in layers)
    assert parameter_count(embedded) == shared + per_member
    assert parameter_count(embedded) <= 0.3 * parameter_count(independent)


def _layers(ensemble):
    return [m for m in ensemble.body.modules() if isinstance(m, (EmbeddedConv2d, EmbeddedLinear))]


def test_mc_dropout_masks_are_fixed_and_spare_the_first_layer():
    ensemble, x = _embedded("cnn", "mc_dropout", members=4)
    layers = _layers(ensemble)
    assert layers[0].in_mask is None  # the layer reading the picture is not masked
    for layer in layers[1:]:
        inputs = layer.in_channels if isinstance(layer, EmbeddedConv2d) else layer.in_features
        assert layer.in_mask.shape == (4, inputs) and layer.in_scale is None and layer.out_scale is None
        # Bernoulli(0.6) masks, kept channels scaled by 1 / 0.6; every member keeps some channel
        kept = layer.in_mask > 0
        assert kept.any(1).all() and torch.all(layer.in_mask[kept] == torch.tensor(1 / 0.6, dtype=torch.float32))
        assert not torch.equal(layer.in_mask[0], layer.in_mask[1])
    assert "in_mask" not in {name.rsplit(".", 1)[-1] for name, _ in ensemble.named_parameters()}  # not trained
    ensemble.train()
    torch.testing.assert_close(ensemble(x), ensemble(x))  # deterministic: no mask is redrawn


def test_a_run_folder_keeps_the_masks(tmp_path):
    from safetensors.torch import load_file

    from training.run import write_weights

    ensemble, _ = _embedded("cnn", "mc_dropout", members=2, dtype=torch.float32)
    write_weights(tmp_path, ensemble)
    torch.manual_seed(1)  # a rebuilt ensemble draws other masks; loading the run's restores them
    rebuilt = build_ensemble("cnn", 2, SHAPES["cnn"], 5, [0.5], [2.0], width=8, structure="mc_dropout")
    assert not torch.equal(_layers(rebuilt)[1].in_mask, _layers(ensemble)[1].in_mask)
    rebuilt.load_state_dict(load_file(str(tmp_path / "members.safetensors")))
    assert torch.equal(_layers(rebuilt)[1].in_mask, _layers(ensemble)[1].in_mask)


@pytest.mark.parametrize("structure", EMBEDDED)
def test_forde_gradients_through_shared_weights_follow_the_chain_rule(structure):
    """The FoRDE loss (CE + repulsion, with its double backward) of the embedded ensemble equals the
    folded one's, and its gradient w.r.t. the shared W and the modulations is the chain rule through
    W_a = diag(r_a) W diag(s_a): dL/dW = sum_a dL/dW_a o (r_a s_a^T)."""
    ensemble, x = _embedded("cnn", structure)
    y = torch.tensor([0, 1, 2, 3])
    folded = folded_ensemble(ensemble)
    for model in (ensemble, folded):
        model.train()

    def loss(model):
        ce, _, _ = loss_terms(model, x, y, None)
        _, grads = member_input_gradients(model, model.normalize(x), y, create_graph=True)
        return ce + repulsion_term(grads.flatten(2).transpose(0, 1))

    embedded_loss, folded_loss = loss(ensemble), loss(folded)
    torch.testing.assert_close(embedded_loss, folded_loss, rtol=1e-10, atol=1e-12)
    embedded_loss.backward()
    folded_loss.backward()
    for name, layer in ensemble.body.named_modules():
        if not isinstance(layer, (EmbeddedConv2d, EmbeddedLinear)):
            continue
        per_member = folded.body.get_submodule(name).weight.grad  # dL/dW_a, [M, out, in, ...]
        factor = layer.folded_weight() / layer.weight.detach().unsqueeze(0)  # r_a s_a^T where W != 0
        torch.testing.assert_close(layer.weight.grad, (per_member * factor).sum(0), rtol=1e-8, atol=1e-12)
        if layer.out_scale is not None:
            extra = tuple(range(2, per_member.ndim))
            through = (per_member * layer.folded_weight()).sum(extra) / layer.out_scale.detach()
            torch.testing.assert_close(layer.out_scale.grad, through, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("gamma", [1, "M"])
def test_the_shared_step_is_gamma_over_m_times_the_summed_gradient(gamma):
    """One SGD step (no momentum): W -= lr (gamma / M * sum_a dL_a/dW + wd W); r, s -= ratio lr dL/dr (no
    decay); biases -= lr (dL/db + wd b)."""
    members, lr, wd, ratio = 4, 0.1, 0.01, 0.5
    config = TrainConfig.model_validate(
        {
            "ensemble": {"members": members, "structure": "batchensemble", "method": "de"},
            "embedded": {"shared_grad_scale": gamma, "modulation_lr_ratio": ratio},
            "optim": {"lr": lr, "weight_decay": wd, "momentum": 0.0, "nesterov": False},
        }
    )
    torch.manual_seed(0)
    ensemble = build_ensemble("mlp", members, (1, 8, 8), 5, [0.0], [1.0], width=16, structure="batchensemble")
    optimizer = build_optimizer(ensemble, config)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    ce, _, _ = loss_terms(ensemble, x, y, None)
    ce.backward()
    before = {name: p.detach().clone() for name, p in ensemble.named_parameters()}
    grads = {name: p.grad.clone() for name, p in ensemble.named_parameters()}
    optimizer.step()
    share = (members if gamma == "M" else 1) / members
    for name, p in ensemble.named_parameters():
        if name.endswith(".weight"):
            want = before[name] - lr * (share * grads[name] + wd * before[name])
        elif name.endswith(("in_scale", "out_scale")):
            want = before[name] - ratio * lr * grads[name]
        else:
            want = before[name] - lr * (grads[name] + wd * before[name])
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_structure_and_its_options_are_validated(tmp_path):
    config = load_config(ROOT / "training/configs/digits.toml")
    assert config.ensemble.structure == "independent" and config.embedded.shared_grad_scale == 1
    assert with_overrides(config, structure="mc_dropout").ensemble.structure == "mc_dropout"
    with pytest.raises(ConfigError, match="ensemble.structure: .*'batchensemble'.*got 'batch'"):
        with_overrides(config, structure="batch")
    for line, field in (
        ("keep_prob = 1.0", "embedded.keep_prob"),
        ("shared_grad_scale = 2", "embedded.shared_grad_scale"),
    ):
        (tmp_path / "c.toml").write_text(f"[embedded]\n{line}\n")
        with pytest.raises(ConfigError, match=field):
            load_config(tmp_path / "c.toml")


def _train_without_dropout(model: nn.Module) -> nn.Module:
    """Train mode (batch-norm statistics of the batch), with dropout's random masks off to compare."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return model


@pytest.mark.slow  # builds torchvision networks
@pytest.mark.parametrize("structure", EMBEDDED)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_members_embed(name, structure):
    """By module swap: each member equals a plain copy with folded weights, in eval mode (checked by
    embed_member itself) and in train mode (per-member batch-norm statistics), input gradients too."""
    import torchvision.models as tv

    torch.manual_seed(0)
    kwargs = {"width_mult": 0.25} if name.startswith("mobilenet") else {}
    member = tv.get_model(name, num_classes=5, **kwargs).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    body = embed_member(member, 2, structure, "normal", 0.7, example=x)
    copies = [_train_without_dropout(plain) for plain in folded_copies(member, body)]
    x_members = fold_members(x, 2).requires_grad_(True)
    out = _train_without_dropout(body)(x_members).unflatten(1, (2, 5))
    (grads,) = torch.autograd.grad(out[:, :, 0].sum(), x_members)
    for m, plain in enumerate(copies):
        x_plain = x.clone().requires_grad_(True)
        want = plain(x_plain)
        torch.testing.assert_close(out[:, m], want, rtol=1e-8, atol=1e-9)
        (want_grads,) = torch.autograd.grad(want[:, 0].sum(), x_plain)
        # Through batch statistics of 2 inputs summation order shows (measured up to 1e-9 absolute);
        # relative to the gradients' own scale, as tests/test_model_families.py compares train mode.
        scale = float(want_grads.abs().max())
        torch.testing.assert_close(grads[:, 3 * m : 3 * m + 3], want_grads, rtol=1e-6, atol=1e-6 * scale)


def _modulated_outputs(init: str, draws: int, width: int = 512, classes: int = 50) -> np.ndarray:
    """`[draws * classes, 2]`: two BatchEnsemble members' outputs for one fixed input over fresh
    initializations of a wide MLP, less the output bias (see the test)."""
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    outputs = []
    for seed in range(draws):
        torch.manual_seed(seed)
        body = embed_member(build_member("mlp", (1, 8, 8), classes, width, 2), 2, "batchensemble", init).eval()
        with torch.no_grad():
            out = body(fold_members(x, 2)).unflatten(1, (2, classes))[0] - body[-1].bias  # [M, classes]
        outputs.append(out.T.numpy())
    return np.concatenate(outputs)


def test_regimes_at_initialization():
    """docs/design.md section 11 (the seed's Theorems 1-2, infinite width): when the last layer's
    modulation has mean zero (random signs) the members' outputs are independent; with mean one
    (N(1, 0.5)) and ReLU, positively correlated. Over 100 initializations of a width-512 MLP x 50
    outputs (a correlation near 0 has a standard error of about 0.014).

    In BatchEnsemble's form y = s o (W (r o x)) + b the bias is added after s, and every member's
    bias starts as the same draw b: a common offset the theorem's layer (which modulates z + b) does
    not have, so it is subtracted (with it, random signs measured 0.067 at 10 outputs)."""
    independent = np.corrcoef(_modulated_outputs("random_sign", 100).T)[0, 1]
    collective = np.corrcoef(_modulated_outputs("normal", 100).T)[0, 1]
    assert abs(independent) < 0.06, independent  # measured 0.008
    assert collective > 0.2, collective  # measured 0.34


def test_weight_cosine_similarity_tells_independent_from_shared_weights():
    torch.manual_seed(0)
    independent = build_ensemble("cnn", 3, (1, 8, 8), 10, [0.0], [1.0], width=16)
    cosine = weight_cosine_similarity(independent)
    assert cosine.shape == (3, 3) and np.allclose(np.diag(cosine), 1.0) and np.allclose(cosine, cosine.T)
    assert np.abs(cosine[~np.eye(3, dtype=bool)]).max() < 0.1  # independent inits: near 0
    ensemble, _ = _embedded("cnn", "mc_dropout", members=3)
    shared = weight_cosine_similarity(ensemble)
    assert shared[~np.eye(3, dtype=bool)].min() > 0.3  # one W under different masks
    assert math.isclose(float(weight_cosine_similarity(ensemble)[0, 1]), float(shared[1, 0]))
