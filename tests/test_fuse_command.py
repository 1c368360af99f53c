"""`forde fuse`: members trained elsewhere with plain torchvision code become one exported ensemble
that computes what the separate models compute; checkpoints that do not belong together are named."""

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from forde_serve.errors import FordeError
from forde_serve.runtime import EnsembleRuntime
from training.config import ConfigError

from helpers import invoke_forde, run_forde

slow = pytest.mark.slow  # trains members, runs the real command (and exports)

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
CLASSES = ["cat", "dog", "owl", "fox"]


def _trained(builder, classes: int, seed: int) -> torch.nn.Module:
    """A couple of SGD steps on random data, as anyone's own training script would do them."""
    torch.manual_seed(seed)
    model = builder(num_classes=classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for _ in range(2):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, classes, (8,))
        loss = torch.nn.functional.cross_entropy(model((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    models = [_trained(torchvision.models.resnet18, 4, seed) for seed in (0, 1)]
    save_file(models[0].state_dict(), str(folder / "a.safetensors"))
    torch.save(models[1].state_dict(), folder / "b.pt")
    torch.save(_trained(torchvision.models.resnet34, 4, 2).state_dict(), folder / "resnet34.pt")
    torch.save(_trained(torchvision.models.resnet18, 3, 3).state_dict(), folder / "three_classes.pt")
    return folder, models


@slow
def test_fused_checkpoints_equal_the_separate_models(checkpoints, tmp_path):
    folder, models = checkpoints
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (12, 3, 32, 32)).astype(np.float32)
    # labels the ensemble gets 8 of 12 right: a temperature with a minimum inside the search (random labels
    # would push it to the bound, where the file keeps 1 and says so)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        top = sum(model((torch.from_numpy(x) - mean) / std).softmax(-1) for model in models).argmax(-1).numpy()
    labels = np.where(np.arange(12) < 8, top, (top + 1) % 4)
    np.savez(tmp_path / "val.npz", x=x, y=labels)
    result = run_forde(
        "fuse",
        folder / "a.safetensors",
        folder / "b.pt",
        "--arch",
        "torchvision:resnet18",
        "--input-shape",
        "3,32,32",
        "--mean",
        ",".join(map(str, MEAN)),
        "--std",
        ",".join(map(str, STD)),
        "--classes",
        ",".join(CLASSES),
        "--validation",
        tmp_path / "val.npz",
        "--out",
        tmp_path / "fused.onnx",
    )
    assert "✗" not in result.stdout and "abstain when mutual_information" in result.stdout

    runtime = EnsembleRuntime(tmp_path / "fused.onnx")
    card = runtime.card
    assert (card.method, card.members, card.class_names, card.input_shape) == (
        "external",
        2,
        tuple(CLASSES),
        (3, 32, 32),
    )
    assert card.training_config["fused_from"] == ["a.safetensors", "b.pt"]
    assert card.choices.abstention.target_risk == 0.01

    assert card.temperature != 1.0  # fitted inside the search
    assert set(card.coverage_levels) >= {0.8, 0.9, 0.95, 0.99}
    # the separate models, in PyTorch, on the raw inputs, with the fitted temperature: softmax and input gradients
    raw = torch.from_numpy(x[:5]).requires_grad_(True)
    targets = torch.tensor([0, 1, 2, 3, 0])
    probs, grads = [], []
    for model in models:
        logits = model((raw - mean) / std) / card.temperature
        probs.append(logits.softmax(-1).detach().numpy())
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), raw)
        grads.append(grad.numpy())
    probs, grads = np.stack(probs, 1), np.stack(grads, 1)  # [batch, members, ...]

    out = runtime.explain(x[:5], targets.numpy())
    np.testing.assert_allclose(out["member_probs"], probs, atol=1e-5)
    np.testing.assert_allclose(out["probs"], probs.mean(1), atol=1e-5)
    got, want = out["input_gradients"].reshape(10, -1), grads.reshape(10, -1)
    relative = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert np.median(relative) < 1e-4 and relative.max() < 1e-2, relative


@slow
@pytest.mark.parametrize(
    "bad,message",
    [
        ("resnet34.pt", "resnet34.pt: key 'layer1.2.conv1.weight' is not a weight of torchvision:resnet18"),
        (
            "three_classes.pt",
            "three_classes.pt: key 'fc.weight' has shape [3, 512], torchvision:resnet18 with 4 classes",
        ),
    ],
)
def test_checkpoints_that_do_not_belong_together_are_named(checkpoints, tmp_path, bad, message):
    folder, _ = checkpoints
    result = run_forde(
        "fuse",
        folder / "a.safetensors",
        folder / bad,
        "--arch",
        "torchvision:resnet18",
        "--input-shape",
        "3,32,32",
        "--out",
        tmp_path / "m.onnx",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.onnx").exists()


@slow
def test_bad_files_and_names_are_refused_by_the_command(checkpoints, tmp_path):
    folder, _ = checkpoints
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # a whole module, pickled: not read
    common = ["--input-shape", "3,32,32", "--out", tmp_path / "m.onnx"]
    cases = [
        ([tmp_path / "junk.pt", "--arch", "torchvision:resnet18"], "CKPT: "),
        (
            [tmp_path / "whole.pt", "--arch", "torchvision:resnet18"],
            "holds pickled objects other than tensors (a whole model saved with torch.save(model), or an optimizer), "
            "which are not read because unpickling them can run any code; save the weights with "
            "torch.save(model.state_dict(), path) and give that file\n",
        ),
        ([folder / "a.safetensors", "--arch", "torchvision:resnet81"], "close matches: torchvision:resnet18"),
        ([folder / "a.safetensors", "--arch", "torchvision:resnet18", "--classes", "a,b"], "--classes: 2 names"),
    ]
    for i, (args, message) in enumerate(cases):
        if i == 1:  # the console script as a user runs it, once
            result = run_forde("fuse", *args, *common, check=False)
            assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        else:  # in process (click's runner): the same command without a new interpreter importing torch
            result = invoke_forde("fuse", *args, *common)
            assert result.exit_code == 2 and message in result.stderr, (args, result.output)


def test_fuse_job_names_bad_arguments(tmp_path):
    from training.export.fuse import FuseError, FuseJob

    def parse(**changes):
        args = {"checkpoints": [tmp_path / "a.pt"], "out": tmp_path / "m.onnx", "arch": "torchvision:resnet18"}
        args |= {"factory": None, "kwargs": None, "input_shape": "3,32,32"} | changes
        return FuseJob.parse(**args)

    assert parse(factory="pkg.mod:build", arch=None).arch == "factory"
    assert parse(kwargs='{"width_mult": 0.5}').kwargs == {"width_mult": 0.5}
    for changes, message in [
        ({"arch": None}, "--arch: required"),
        ({"input_shape": "3,x,32"}, "--input-shape: expected comma-separated integers"),
        ({"input_shape": "3,0,32"}, "--input-shape: expected positive sizes"),
        ({"mean": "0.5"}, "--mean: expected one number per input channel (3, from --input-shape), got 1"),
        ({"std": "1,0,1"}, "--std: expected positive numbers"),
        ({"classes": "a,a"}, "--classes: expected distinct non-empty names"),
        ({"classes": "a", "classes_file": tmp_path / "c.txt"}, "give one of them, not both"),
        ({"classes_file": tmp_path / "c.txt"}, "--classes-file: "),
        ({"kwargs": "[1]"}, "--kwargs: expected a JSON object"),
        ({"kwargs": "{width: 1}"}, "--kwargs: expected a JSON object"),
        ({"out": tmp_path / "m.explain.onnx"}, "--out: expected a NAME.onnx path"),
        ({"checkpoints": []}, "CKPT: give at least one checkpoint"),
        ({"kwargs": '{"weights": "DEFAULT"}'}, "model.kwargs.weights: nothing is downloaded"),
    ]:
        with pytest.raises(FordeError) as err:
            parse(**changes)
        assert message in str(err.value), (changes, str(err.value))
        assert isinstance(err.value, (FuseError, ConfigError))
