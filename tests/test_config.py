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
            "model.width: expected none for arch 'torchvision:resnet18', which ignores it (a builder takes its "
            "arguments in model.kwargs), got 16: remove it",
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


ARCHS = ["mlp", "cnn", "resnet18", "preact_resnet18", "torchvision:resnet18", "factory"]
READS = {"mlp": {"width", "depth"}, "cnn": {"width"}}  # the others read neither


def _model_toml(arch: str, keys: dict) -> str:
    factory = "\nfactory = 'my_models:build'" if arch == "factory" else ""
    return f"[model]\narch = '{arch}'{factory}\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", ["width", "depth"])
def test_a_key_the_arch_ignores_is_refused_when_set_even_at_its_default(tmp_path, arch, key):
    path = tmp_path / "model.toml"
    for value in (7, {"width": 32, "depth": 2}[key]):  # the default, written out, is refused as well
        path.write_text(_model_toml(arch, {key: value}))
        if key in READS.get(arch, set()):
            assert getattr(load_config(path).model, key) == value
            continue
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert f"model.{key}: expected none for arch {arch!r}, which ignores it (" in message
        assert message.endswith(f"got {value}: remove it")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_key_left_out_is_not_refused_and_overrides_keep_what_was_set(tmp_path, arch):
    path = tmp_path / "model.toml"
    path.write_text(_model_toml(arch, {}) + "[ensemble]\nmembers = 3\n")
    config = with_overrides(load_config(path), members=4, epochs=2)
    assert (config.model.arch, config.ensemble.members, config.optim.epochs) == (arch, 4, 2)
    assert (config.model.width, config.model.depth) == (32, 2)  # the defaults, unread
    path.write_text(_model_toml("cnn", {"depth": 3}))
    with pytest.raises(ConfigError, match="model.depth: expected none for arch 'cnn'"):
        load_config(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_run_folder_s_resolved_config_loads_again_and_resumes(tmp_path, arch):
    # the resolved config gives every key, the width and depth its arch ignores too: those are dropped
    from training.config import TrainConfig

    model = {"arch": arch, **({"factory": "my_models:build"} if arch == "factory" else {})}
    model |= {key: {"width": 8, "depth": 3}[key] for key in READS.get(arch, set())}
    config = TrainConfig.model_validate({"model": model, "seed": 5})
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert '"depth": ' in path.read_text() and '"width": ' in path.read_text()
    loaded = load_config(path)
    assert loaded == config
    resumed = with_overrides(loaded, device="cpu")  # what `forde train --resume RUN --device cpu` does
    assert (resumed.model, resumed.seed, resumed.device) == (config.model, 5, "cpu")


def test_a_resolved_config_that_kept_a_value_its_arch_ignores_still_loads(tmp_path):
    # earlier versions let a resnet18 config set a width (unread), and its run folder kept it
    from training.config import TrainConfig

    path = tmp_path / "config.json"
    path.write_text(
        TrainConfig().to_json().replace('"arch": "cnn"', '"arch": "resnet18"').replace('"width": 32', '"width": 64')
    )
    assert '"width": 64' in path.read_text()
    model = load_config(path).model
    assert (model.arch, model.width, model.depth) == ("resnet18", 32, 2)
