"""Config files are validated once, at load, with messages that name the bad field."""

from pathlib import Path

import pytest

from training.config import ConfigError, OptimConfig, load_config, with_overrides
from training.trainer import learning_rate

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.optim.batch_size == 128 and config.optim.weight_decay == 5e-4


def test_paper_settings_in_cifar_config():
    config = load_config(Path(__file__).parents[1] / "training/configs/cifar10_resnet18.toml")
    assert (config.model.arch, config.ensemble.members, config.forde.lengthscale) == ("resnet18", 10, "pca")
    assert (config.optim.momentum, config.optim.nesterov, config.optim.lr_ratio) == (0.9, True, 0.01)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[optim]\nlr = -1\n", "optim.lr: input should be greater than 0, got -1"),
        ("[optim]\nepochs = 'ten'\n", "optim.epochs: input should be a valid integer"),
        (
            "[model]\narch = 'vgg'\n",
            "model.arch: expected one of mlp, cnn, resnet18, preact_resnet18, torchvision:NAME or factory, got 'vgg'",
        ),
        ("[optim]\nlearning_rate = 0.1\n", "unknown field 'optim.learning_rate'"),
        ("[ensemble]\nmembers = 1\n", "ensemble.members: FoRDE repels members"),
        ("[data]\ndataset = 'cifar10'\n", "set data.root"),
        ("[forde]\nalpha = 2.0\n", "forde.alpha: input should be less than or equal to 1"),
        ("[optim\nlr = 1\n", "not valid TOML"),
        (
            "[model]\narch = 'torchvision:resnet18'\nwidth = 16\n",
            "model.width: only the built-in architectures (mlp, cnn, resnet18, preact_resnet18) take it",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.toml")


def test_overrides_apply_and_are_validated():
    config = load_config(CONFIGS[0])
    changed = with_overrides(config, method="de", members=1, epochs=3, seed=7, device="cpu")
    assert (changed.ensemble.method, changed.ensemble.members, changed.optim.epochs) == ("de", 1, 3)
    assert (changed.seed, changed.device) == (7, "cpu")
    assert with_overrides(config, method=None) == config
    with pytest.raises(ConfigError, match="command-line overrides: ensemble.members"):
        with_overrides(config, method="forde", members=1)


def test_learning_rate_schedule():
    optim = OptimConfig(epochs=100, lr=0.1, lr_ratio=0.01)
    assert learning_rate(optim, 0) == learning_rate(optim, 50) == 0.1
    assert learning_rate(optim, 70) == pytest.approx(0.1 * (1 - 0.99 * 0.5))
    assert learning_rate(optim, 90) == pytest.approx(0.001)
    assert learning_rate(optim, 99) == pytest.approx(0.001)


def test_a_run_folder_s_resolved_config_of_a_torchvision_arch_loads_again(tmp_path):
    # the resolved config carries the built-ins' default width and depth: those are not refused
    from training.config import TrainConfig

    config = TrainConfig.model_validate({"model": {"arch": "torchvision:resnet18"}})
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert load_config(path) == config
