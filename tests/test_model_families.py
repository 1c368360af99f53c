"""Every checked architecture family, fused: equal to M separately built copies holding the same weights
(forward and input gradients in eval and train mode, FoRDE steps, batch-norm statistics), and exported
to a predict + explain pair that passes the exporter's own validation with a symbolic batch axis.

Small on purpose: M = 2, batch 2 (4 in train mode), 3x32x32 inputs, width_mult 0.25 where the
builder takes it. The equality tests build each family with its own torchvision builder; the export
tests build a shallow member of the same torchvision class (the same block types, one or two blocks
per stage), because exporting costs by the graph's size (one to three minutes per full network on
two busy cores) while the ops the exporter must translate are the family's, whatever its depth.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tv
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.mobilenetv3 import InvertedResidualConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import BasicBlock, Bottleneck

from training.export import export_ensemble
from training.forde import member_input_gradients, repulsion_term
from training.models import ensemble_of
from training.models.layers import TwiceDifferentiableHardsigmoid, TwiceDifferentiableHardswish
from training.models.members import CHECKED_TORCHVISION, build_member
from training.trainer import Repulsion, train_step

from helpers import bare_card

pytestmark = pytest.mark.slow  # builds torchvision networks, trains and exports them


class _Residual(nn.Module):
    """A user's block with its own forward: dilated, grouped, reflect-padded convolution + group norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.conv(x)))


class SmallNet(nn.Module):
    """A plain user model, built through `model.factory = "test_model_families:small_net"`."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = _Residual(width)
        self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.LayerNorm(4 * width),
            nn.Dropout(0.1),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block(self.stem(x))))


def small_net(num_classes: int, width: int = 8) -> nn.Module:
    return SmallNet(num_classes, width)


@dataclass(frozen=True)
class _Family:
    arch: str
    shallow: Callable[[int], nn.Module]  # num_classes -> a shallow member of the same torchvision class
    kwargs: dict = field(default_factory=dict)
    factory: str | None = None


def _mobilenet_v3(settings: list[tuple], last_channel: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        config = [InvertedResidualConfig(*setting, width_mult=0.25) for setting in settings]
        return tv.MobileNetV3(
            config, InvertedResidualConfig.adjust_channels(last_channel, 0.25), num_classes=num_classes
        )

    return build


SMALL = {"width_mult": 0.25}
FAMILIES = {
    "resnet18": _Family("torchvision:resnet18", lambda n: tv.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=n)),
    "resnet34": _Family("torchvision:resnet34", lambda n: tv.ResNet(BasicBlock, [1, 2, 1, 1], num_classes=n)),
    "resnet50": _Family("torchvision:resnet50", lambda n: tv.ResNet(Bottleneck, [1, 1, 1, 1], num_classes=n)),
    "mobilenet_v2": _Family(
        "torchvision:mobilenet_v2",
        lambda n: tv.MobileNetV2(n, 0.25, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]]),
        SMALL,
    ),
    "mobilenet_v3_small": _Family(
        "torchvision:mobilenet_v3_small",
        _mobilenet_v3(  # the first four blocks: squeeze-excitation, ReLU and Hardswish, a residual
            [
                (16, 3, 16, 16, True, "RE", 2, 1),
                (16, 3, 72, 24, False, "RE", 2, 1),
                (24, 3, 88, 24, False, "RE", 1, 1),
                (24, 5, 96, 40, True, "HS", 2, 1),
            ],
            1024,
        ),
        SMALL,
    ),
    "mobilenet_v3_large": _Family(
        "torchvision:mobilenet_v3_large",
        _mobilenet_v3(
            [
                (16, 3, 16, 16, False, "RE", 1, 1),
                (16, 3, 64, 24, False, "RE", 2, 1),
                (24, 5, 72, 40, True, "RE", 2, 1),
                (40, 3, 240, 80, False, "HS", 2, 1),
                (80, 3, 480, 112, True, "HS", 1, 1),
            ],
            1280,
        ),
        SMALL,
    ),
    "efficientnet_b0": _Family(
        "torchvision:efficientnet_b0",
        lambda n: tv.EfficientNet(
            [MBConvConfig(1, 3, 1, 32, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 2)], 0.2, num_classes=n
        ),
    ),
    "regnet_y_400mf": _Family(
        "torchvision:regnet_y_400mf",
        lambda n: tv.RegNet(BlockParams([1, 2], [16, 32], [8, 8], [1.0, 1.0], [2, 2], 0.25), n, stem_width=16),
    ),
    "convnext_tiny": _Family(
        "torchvision:convnext_tiny",
        lambda n: tv.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], 0.1, num_classes=n),
    ),
    "factory": _Family("factory", lambda n: small_net(n), {"width": 8}, "test_model_families:small_net"),
}
SHAPE, CLASSES, MEMBERS = (3, 32, 32), 5, 2
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def test_every_checked_family_has_tests():
    assert set(FAMILIES) == {*CHECKED_TORCHVISION, "factory"}


def _members(name: str) -> list[nn.Module]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    return [
        build_member(family.arch, SHAPE, CLASSES, kwargs=family.kwargs, factory=family.factory) for _ in range(MEMBERS)
    ]


def _no_dropout(model: nn.Module) -> None:
    """Train mode without randomness (dropout, stochastic depth), so fused and copies can be compared."""
    for module in model.modules():
        if isinstance(getattr(module, "p", None), float):
            module.p = 0.0


def _twice_differentiable(model: nn.Module) -> nn.Module:
    """The copies' Hardsigmoid/Hardswish swapped for their twice-differentiable equals (equal in forward,
    tests/test_fusion.py), so the copies can take the FoRDE step too, as the fused module does."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if type(child) is nn.Hardsigmoid:
                setattr(parent, child_name, TwiceDifferentiableHardsigmoid())
            elif type(child) is nn.Hardswish:
                setattr(parent, child_name, TwiceDifferentiableHardswish())
    return model


def _copies_step(copies, z, y):
    """The FoRDE objective over separate copies: (logits [B, M, C], input gradients [B, M, ...], loss)."""
    logits, grads = [], []
    for member in copies:
        z_member = z.detach().clone().requires_grad_(True)
        out = member(z_member)
        (grad,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), z_member, create_graph=True)
        logits.append(out)
        grads.append(grad)
    logits, grads = torch.stack(logits, 1), torch.stack(grads, 1)
    return logits, grads, _objective(logits, grads, y)


def _objective(logits, grads, y):
    ce = sum(F.cross_entropy(logits[:, m], y) for m in range(logits.shape[1]))
    return ce + repulsion_term(grads.flatten(2).transpose(0, 1))


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-7, msg: str = "") -> None:
    """Every element within `rel` times the tensor's largest |expected| (plus 1e-9 for tensors that are
    rounding noise around zero). In train mode, small elements carry the rounding of large ones through
    batch norm over 4 values, so an element-wise relative tolerance fails on rounding alone, depending
    on the CPU's kernels: EfficientNet's input gradients at the second step were 6.5e-7 apart where
    |expected| reaches 596 (1.1e-9 of the scale), its weights after two steps 2e-8 apart at a scale of
    15. A wrong fusion is off by the order of the values themselves."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-9 + rel * scale, msg=msg or None)


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_equals_separate_copies(name):
    copies = _members(name)
    ensemble = ensemble_of(copies, SHAPE, CLASSES, MEAN, STD).double()
    copies = [_twice_differentiable(member.double()) for member in copies]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, *SHAPE, dtype=torch.float64, generator=generator)
    y = torch.tensor([1, 3])
    close = {"rtol": 1e-7, "atol": 1e-9}
    # Train mode: batch norm over a batch of 4 (at 1x1 spatial size in the last stages of most
    # families); with fewer inputs its statistics are so ill-conditioned that float64 rounding grows
    # to ~1e-5 through the double backward.
    y_train = torch.tensor([1, 3, 0, 2])

    # eval mode: logits and each member's input gradient
    ensemble.eval()
    for member in copies:
        member.eval()
    z = ensemble.normalize(x)
    logits, grads = member_input_gradients(ensemble, z, y)
    want_logits, want_grads, _ = _copies_step(copies, z, y)
    torch.testing.assert_close(logits, want_logits.detach(), **close)
    torch.testing.assert_close(grads, want_grads.detach(), **close)

    # train mode: FoRDE steps (double backward) on both sides, compared before every step
    _no_dropout(ensemble)
    for member in copies:
        _no_dropout(member.train())
    ensemble.train()
    fused_opt = torch.optim.SGD(ensemble.parameters(), lr=0.05)
    copies_opt = torch.optim.SGD(itertools.chain(*(m.parameters() for m in copies)), lr=0.05)
    for _ in range(2):
        x = torch.rand(4, *SHAPE, dtype=torch.float64, generator=generator)
        z = ensemble.normalize(x)
        logits, grads = member_input_gradients(ensemble, z, y_train, create_graph=True)
        want_logits, want_grads, copies_loss = _copies_step(copies, z, y_train)
        _assert_close_to_scale(logits, want_logits)
        _assert_close_to_scale(grads, want_grads)
        for optimizer, loss in ((fused_opt, _objective(logits, grads, y_train)), (copies_opt, copies_loss)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    # the weights and the batch-norm statistics after the steps, member by member
    fused_state = ensemble.body.state_dict()
    for m, member in enumerate(copies):
        for key, value in member.state_dict().items():
            _assert_close_to_scale(fused_state[key][m], value, msg=f"{key} of member {m}")
    if name != "convnext_tiny":  # ConvNeXt has layer norm only
        assert any(key.endswith("running_mean") for key in fused_state)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "convnext_tiny"])
def test_a_forde_training_step_runs_through(name):
    """The trainer's own step (float32, dropout and stochastic depth on): Hardswish/Hardsigmoid in
    MobileNetV3 and GELU + layer norm in ConvNeXt must be differentiable twice once fused."""
    ensemble = ensemble_of(_members(name), SHAPE, CLASSES, MEAN, STD).train()
    before = [p.detach().clone() for p in ensemble.parameters()]
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.01)
    x, y = torch.rand(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    ce, r, _ = train_step(ensemble, optimizer, x, y, Repulsion(None, None, 1e-12, None))
    assert torch.isfinite(ce) and torch.isfinite(r)
    assert all(torch.isfinite(p).all() for p in ensemble.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, ensemble.parameters(), strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_family_exports_and_validates(name, tmp_path):
    torch.manual_seed(0)
    members = [FAMILIES[name].shallow(CLASSES) for _ in range(MEMBERS)]
    ensemble = ensemble_of(members, SHAPE, CLASSES, MEAN, STD)
    with torch.no_grad():  # settle batch-norm statistics, as a trained model has them
        ensemble.train()
        for _ in range(3):
            ensemble(torch.rand(8, *SHAPE))
    # traced on 2 inputs, validated on 3: the batch axis must really be free
    x, target = torch.rand(3, *SHAPE), torch.tensor([-1, 2, -1])
    lines = []
    paths = export_ensemble(
        ensemble, tmp_path / f"{name}.onnx", bare_card(SHAPE, MEMBERS, CLASSES), x, target, echo=lines.append
    )
    assert set(paths) == {"predict", "explain"} and all(p.exists() for p in paths.values())
    assert len(lines) == 15 and all("✓" in line for line in lines), lines


@pytest.mark.parametrize(
    ("name", "structure", "layout"),
    [
        ("resnet18", "batchensemble", "native"),
        ("resnet18", "batchensemble", "folded"),
        ("mobilenet_v3_small", "batchensemble", "native"),
        ("mobilenet_v3_small", "batchensemble", "folded"),
        ("resnet18", "mc_dropout", "native"),
    ],
)
def test_embedded_family_exports_and_validates(name, structure, layout, tmp_path):
    """The embedded ensembles' two layouts of the same families: one shared network (native) or the
    folded per-member weights, each checked against the PyTorch embedded ensemble by the exporter."""
    from forde_serve.contract import ModelCard
    from training.models import Ensemble
    from training.models.embedded import embed_member

    torch.manual_seed(0)
    body = embed_member(FAMILIES[name].shallow(CLASSES), MEMBERS, structure, "normal", 0.7, torch.rand(2, *SHAPE))
    ensemble = Ensemble(body, MEMBERS, SHAPE, CLASSES, MEAN, STD, structure=structure)
    with torch.no_grad():  # settle batch-norm statistics, as a trained model has them
        ensemble.train()
        for _ in range(3):
            ensemble(torch.rand(8, *SHAPE))
    x, target = torch.rand(3, *SHAPE), torch.tensor([-1, 2, -1])
    lines = []
    paths = export_ensemble(
        ensemble, tmp_path / "m.onnx", bare_card(SHAPE, MEMBERS, CLASSES), x, target, echo=lines.append, layout=layout
    )
    assert len(lines) == 15 and all("✓" in line for line in lines), lines
    import onnx

    props = {p.key: p.value for p in onnx.load(str(paths["predict"])).metadata_props}
    card = ModelCard.from_metadata(props)
    assert card.structure == structure and card.layout["predict"] == layout and card.parameters > 0


def test_a_config_builds_the_factory_model(tmp_path):
    """`model.factory` in a config file, as `forde train` reads it, down to the fused ensemble."""
    from training.config import load_config
    from training.run import DatasetInfo, new_ensemble

    path = tmp_path / "factory.toml"
    path.write_text(
        '[model]\nfactory = "test_model_families:small_net"\nkwargs = { width = 4 }\n[ensemble]\nmembers = 3\n'
    )
    config = load_config(path)
    assert (config.model.arch, config.model.kwargs) == ("factory", {"width": 4})
    info = DatasetInfo("pictures", tuple("abcde"), SHAPE, tuple(MEAN), tuple(STD), "RGB in [0, 1]", None)
    ensemble = new_ensemble(config, info)
    assert ensemble(torch.rand(2, *SHAPE)).shape == (2, 3, 5)
    assert ensemble.body.stem[0].weight.shape == (3, 4, 3, 3, 3)  # [members, out, in, kh, kw]
