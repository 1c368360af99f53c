"""Names that several places spell live in registries (timm-style); every registered name gets a test
here through the registry itself, so a name added without a way to test it fails."""

import numpy as np
import pytest

from forde_serve.corruptions import CORRUPTIONS, HELD_OUT_SHIFTS, SEVERITIES, corrupt, shift
from forde_serve.scoring import ENGINES
from training.config import DATASET_NAMES

from helpers import write_cifar, write_image_folder


def _digits(tmp_path):
    return {}


def _cifar(name):
    def write(tmp_path):
        write_cifar(tmp_path, name, [12] * 5 if name == "cifar10" else [60], 20, 10 if name == "cifar10" else 100)
        return {"root": str(tmp_path)}

    return write


def _image_folder(tmp_path):
    write_image_folder(tmp_path / "pictures", {"train": 6, "val": 2, "test": 2})
    return {"root": str(tmp_path / "pictures"), "image_size": 8}


# How to make each registered dataset's data here; a name missing from this dict fails its test.
_DATA = {"digits": _digits, "cifar10": _cifar("cifar10"), "cifar100": _cifar("cifar100"), "imagefolder": _image_folder}


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_registered_dataset_loads_in_its_raw_input_space(name, tmp_path):
    from training.config import DataConfig
    from training.data import DATASETS, load_dataset

    assert name in _DATA, f"dataset {name!r} is registered but this test cannot make its data: add it to _DATA"
    assert set(DATASETS) == set(DATASET_NAMES)
    data = load_dataset(DataConfig(dataset=name, **_DATA[name](tmp_path)))
    assert data.name == name and len(data.train) and len(data.val)
    x = data.val.x
    assert tuple(x.shape[1:]) == data.input_shape and x.dtype.is_floating_point
    assert len(data.class_names) > int(data.val.y.max())
    assert data.image is not None and data.image.channels == data.input_shape[0]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_digits_c_corruption_grows_with_severity(name, digits):
    x = digits[0][:50]
    change = [np.abs(corrupt(x, name, s, seed=1) - x).mean() for s in SEVERITIES]
    assert 0 < change[0] < change[-1], change
    assert np.array_equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1))


@pytest.mark.parametrize("name", list(HELD_OUT_SHIFTS))
def test_every_held_out_shift_is_its_own_and_not_in_digits_c(name, digits):
    x = digits[0][:50]
    shifted = shift(x, name, seed=0)
    assert shifted.shape == x.shape and 0 <= shifted.min() and shifted.max() <= 16
    assert not np.allclose(shifted, x) and name not in CORRUPTIONS


def test_the_scoring_engines_are_the_cli_s_choices():
    from click.testing import CliRunner

    from forde_serve.app.cli import main

    shown = CliRunner().invoke(main, ["score", "--help"]).output
    assert ENGINES == ("local", "ray") and "[local|ray]" in shown
