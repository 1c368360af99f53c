"""Your own pictures: the image-folder layout and its errors, the held-out validation split, the
normalization statistics, streamed training batches, the serving side's conversion (equal to
torchvision's evaluation transform), and the RGB corruption suite."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from forde_serve.contract import ImageSpec
from forde_serve.images import image_to_input
from training.config import ConfigError, DataConfig, load_config
from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupted_versions
from training.data import Dataset, DatasetError, Split, augment_batch, load_dataset

from helpers import PICTURE_CLASSES, draw_picture, write_image_folder


def _config(root, **fields) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), image_size=fields.pop("image_size", 8), **fields)


def _eval_transform(size: int, resize: int) -> v2.Compose:
    """torchvision's evaluation transform, written out here independently of training/data.py."""
    return v2.Compose(
        [v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    )


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "pictures", {"train": 6, "test": 2})


def _unreadable(folder, split):
    path = folder / split / "disc" / "broken.png"
    path.write_bytes(b"not a picture at all")
    return path


def _damage(folder, how: str):
    """The folder broken one way; returns the root to load."""
    if how == "no-root":
        return folder / "nowhere"
    if how == "no-train":
        shutil.rmtree(folder / "train")
    elif how == "no-class":
        for name in PICTURE_CLASSES:
            shutil.rmtree(folder / "train" / name)
    elif how == "empty-class":
        for path in (folder / "train" / "square").iterdir():
            path.unlink()
    elif how == "class-missing":
        shutil.rmtree(folder / "test" / "triangle")
    elif how == "class-extra":
        (folder / "test" / "cow").mkdir()
    else:
        _unreadable(folder, how.removeprefix("bad-"))
    return folder


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-root", "data.root: expected an image folder holding train/<class>/ pictures"),
        ("no-train", "has no train/ folder"),
        ("no-class", "expected one folder of pictures per class, found no folder"),
        ("empty-class", "expected at least one picture (.png, .jpg, .jpeg, .webp, .bmp) in every class folder"),
        ("class-missing", "test: expected the same class folders as train/ (3), got missing ['triangle']"),
        ("class-extra", "got not in train/: ['cow']"),
        ("bad-train", "broken.png: expected a readable picture"),
        ("bad-test", "broken.png: expected a readable picture"),
    ],
)
def test_layout_errors_name_what_is_wrong_before_training(folder, how, message):
    with pytest.raises(DatasetError) as err:
        load_dataset(_config(_damage(folder, how)))
    assert message in str(err.value)
    if how == "empty-class":
        assert "found none in 'square'" in str(err.value)


def test_unreadable_picture_names_the_file(folder):
    path = _unreadable(folder, "train")
    with pytest.raises(DatasetError, match="does not decode") as err:
        load_dataset(_config(folder))
    assert str(path) in str(err.value)
    # Export and evaluation read only the validation and test splits: a broken training picture is not theirs.
    assert load_dataset(_config(folder), for_training=False).mean is None


@pytest.mark.parametrize(
    "data, message",
    [
        ('dataset = "imagefolder"\nroot = "x"\n', "data.image_size: an imagefolder dataset needs the model's input"),
        ('dataset = "digits"\nimage_size = 32\n', "data.image_size: only an imagefolder dataset takes it"),
        ('dataset = "imagefolder"\nroot = "x"\nimage_size = 32\nresize = 30\n', "data.resize: expected at least"),
        ('dataset = "imagefolder"\nroot = "x"\nimage_size = 32\nmean = [0.5, 0.5, 0.5]\n', "give both"),
        ('dataset = "imagefolder"\nroot = "x"\nimage_size = 32\ncrop_scale = [0.5, 0.2]\n', "data.crop_scale"),
        ('dataset = "imagefolder"\nimage_size = 32\n', "set data.root"),
    ],
)
def test_bad_image_folder_configs_name_the_field(tmp_path, data, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[data]\n{data}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_default_resize_keeps_the_central_seven_eighths():
    assert _config("x", image_size=32).resize_to == 37  # round(32 * 8 / 7)
    assert _config("x", image_size=224).resize_to == 256  # torchvision's ImageNet evaluation transform
    assert _config("x", image_size=32, resize=32).resize_to == 32


def test_without_val_a_fixed_stratified_tenth_of_train_is_held_out(tmp_path):
    root = write_image_folder(tmp_path / "p", {"train": 20}, formats=("png",))
    first, again = load_dataset(_config(root)), load_dataset(_config(root))
    other = load_dataset(_config(root, split_seed=1))
    assert first.test is None
    assert (len(first.train), len(first.val)) == (54, 6)
    assert torch.bincount(first.val.y).tolist() == [2, 2, 2]  # round(10% of 20) per class
    assert first.val.files == again.val.files and first.val.files != other.val.files
    assert not set(first.val.files) & set(first.train.files)
    assert len(set(first.val.files) | set(first.train.files)) == 60
    # labels follow the sorted class folders, as torchvision's ImageFolder numbers them
    assert first.class_names == tuple(sorted(PICTURE_CLASSES))
    assert all(f.parent.name == first.class_names[int(y)] for f, y in zip(first.val.files, first.val.y, strict=True))


def test_a_given_val_folder_is_used_as_it_is(tmp_path):
    root = write_image_folder(tmp_path / "p", {"train": 4, "val": 3}, formats=("png",))
    data = load_dataset(_config(root))
    assert (len(data.train), len(data.val)) == (12, 9)
    assert all("/val/" in str(f) for f in data.val.files)


def test_statistics_are_the_train_split_s_at_the_evaluation_transform(folder):
    data = load_dataset(_config(folder, image_size=12))
    transform = _eval_transform(12, 14)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in data.train.files]).double()
    assert data.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert data.std == pytest.approx(x.transpose(0, 1).flatten(1).std(1).tolist(), rel=1e-6)
    torch.testing.assert_close(
        data.test.x, torch.stack([transform(Image.open(f).convert("RGB")) for f in data.test.files])
    )
    assert data.input_shape == (3, 12, 12) and data.image.size == (12, 12) and data.image.resize == 14
    given = load_dataset(_config(folder, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0)))
    assert (given.mean, given.std) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))


def test_training_batches_are_a_function_of_the_generator_alone(folder):
    data = load_dataset(_config(folder))

    def epoch(generator, loaded=data):
        return list(loaded.train_batches(generator, batch_size=5))

    generator = torch.Generator().manual_seed(7)
    first = epoch(generator)
    saved = generator.get_state()  # what a checkpoint keeps after epoch 1
    second = epoch(generator)
    assert [len(x) for x, _ in first] == [5, 5, 5]  # 18 pictures: the 3-picture tail is skipped
    resumed = torch.Generator()
    resumed.set_state(saved)
    parallel = load_dataset(_config(folder, workers=2), for_training=False)
    again = epoch(resumed, parallel)  # another process decodes, and the same batches come back
    for (x, y), (x2, y2) in zip(second, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[0][0], second[0][0])  # a new order and new crops every epoch
    # augmented: not the evaluation transform, but pictures of the right shape and range
    plain = load_dataset(_config(folder, augment=False), for_training=False)
    unaugmented = epoch(torch.Generator().manual_seed(7), plain)
    assert all(torch.equal(y, y2) for (_, y), (_, y2) in zip(first, unaugmented, strict=True))
    assert not torch.equal(first[0][0], unaugmented[0][0])
    x = first[0][0]
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_in_memory_batches_are_the_loop_they_replace():
    """digits and CIFAR keep their path: one randperm per epoch, then per batch index + augment_batch."""
    x = torch.rand(21, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(21)
    cifar_like = Dataset(
        "cifar10", (), (3, 32, 32), (0.5,) * 3, (0.25,) * 3, Split(x, y), Split(x, y), None, True, None, ""
    )
    got = list(cifar_like.train_batches(torch.Generator().manual_seed(3), 8, min_rows=6))
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(21, generator=generator)
    expected = [(augment_batch(x[order[s : s + 8]], generator), y[order[s : s + 8]]) for s in (0, 8)]
    assert len(got) == 2  # the 5-row tail is under min_rows
    for (a, b), (c, d) in zip(got, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("size", [8, 16, 24])
def test_serving_conversion_is_torchvision_s_evaluation_transform(tmp_path, size):
    """An upload becomes exactly the input the model was trained and tested on: the same PIL resize,
    the same crop offsets, and the same float32 multiply by 1/255 (torchvision's ToDtype(scale=True))."""
    resize = round(size * 8 / 7)
    spec = load_dataset(_config(write_image_folder(tmp_path / "p", {"train": 1}), image_size=size), for_training=False)
    spec = spec.image
    rng = np.random.default_rng(size)
    transform = _eval_transform(size, resize)
    shapes = [(40, 30), (30, 40), (size, size), (resize, resize + 1), (201, 17), (9, 120), (64, 64)]
    for i, (width, height) in enumerate(shapes):
        picture = draw_picture(PICTURE_CLASSES[i % 3], width, height, rng)
        variants = {"png": picture, "bmp": picture, "jpg": picture, "rgba.png": picture.convert("RGBA")}
        variants["gray.png"] = picture.convert("L")
        variants["palette.png"] = picture.convert("P")
        for suffix, variant in variants.items():
            path = tmp_path / f"{i}.{suffix}"
            variant.save(path)
            with Image.open(path) as reloaded:
                expected = transform(reloaded.convert("RGB")).numpy()
            got = image_to_input(path, spec)
            assert got.dtype == np.float32 and got.shape == (3, size, size)
            assert np.array_equal(got, expected), (width, height, suffix, np.abs(got - expected).max())


def test_digits_and_cifar_specs_convert_as_before(tmp_path):
    picture = draw_picture("disc", 40, 30, np.random.default_rng(0))
    path = tmp_path / "p.png"
    picture.save(path)
    cifar = ImageSpec(mode="RGB", size=(32, 32), scale=1 / 255, invert=False)
    expected = np.asarray(picture.resize((32, 32), Image.BILINEAR), dtype=np.float32) * np.float32(1 / 255)
    assert np.array_equal(image_to_input(path, cifar), expected.transpose(2, 0, 1))
    digits = ImageSpec(mode="L", size=(8, 8), scale=16 / 255, invert=True)
    gray = np.asarray(picture.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float32)
    assert np.array_equal(image_to_input(path, digits)[0], (255.0 - gray) * np.float32(16 / 255))


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    arrays = [np.asarray(draw_picture(PICTURE_CLASSES[i % 3], 20, 20, rng)) for i in range(6)]
    return torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_rgb_suite_is_deterministic_in_range_and_grows_with_severity(pictures):
    sets = list(corrupted_versions(pictures, seed=3))
    assert len(CORRUPTIONS) == 15 and len(sets) == 75
    for name, severity, x in sets:
        assert x.shape == pictures.shape and x.dtype == torch.float32, name
        assert 0.0 <= x.min() and x.max() <= 1.0, name
        assert torch.equal(x, corrupt(pictures, name, severity, seed=3)), f"{name} {severity} not deterministic"
    for name in CORRUPTIONS:
        change = [float((corrupt(pictures, name, s, seed=3) - pictures).abs().mean()) for s in SEVERITIES]
        assert change[0] > 0 and change[4] > change[0], f"{name}: severity 5 should change more than 1: {change}"
    assert not torch.equal(corrupt(pictures, "snow", 3, seed=0), corrupt(pictures, "snow", 3, seed=1))
    # a set's randomness does not depend on which sets came before it
    assert torch.equal(
        corrupt(pictures[:2], "gaussian_noise", 2, seed=5), corrupt(pictures[:2], "gaussian_noise", 2, 5)
    )


def test_rgb_suite_by_hand(pictures):
    # contrast: torchvision's adjust_contrast, a blend toward the grey mean with factor 0.15 at severity 5
    grey = (0.2989 * pictures[:, 0] + 0.587 * pictures[:, 1] + 0.114 * pictures[:, 2]).mean((1, 2))
    expected = (0.15 * pictures + 0.85 * grey[:, None, None, None]).clamp(0, 1)
    torch.testing.assert_close(corrupt(pictures, "contrast", 5), expected, atol=1e-5, rtol=0)
    # brightness in HSV: V + 0.3 with hue and saturation kept, so each channel scales by (V + 0.3) / V
    value = pictures.amax(1, keepdim=True)
    expected = torch.where(value > 0, pictures * (value + 0.3).clamp_max(1) / value, 0.3)
    torch.testing.assert_close(corrupt(pictures, "brightness", 5), expected.clamp(0, 1))
    with pytest.raises(ValueError, match="expected one of"):
        corrupt(pictures, "frost", 1)
    with pytest.raises(ValueError, match="severity: expected 1 to 5, got 0"):
        corrupt(pictures, "fog", 0)
    with pytest.raises(ValueError, match=r"expected RGB pictures \[N, 3, H, W\]"):
        corrupt(pictures[:, :1], "fog", 1)
