"""Datasets: the bundled digits split, CIFAR from a local folder in torchvision's layout."""

import pickle

import pytest
import torch

from training.config import DataConfig
from training.data import DatasetError, augment_batch, load_dataset

from helpers import write_cifar


def test_digits_split_is_fixed_disjoint_and_raw():
    first = load_dataset(DataConfig(dataset="digits"))
    again = load_dataset(DataConfig(dataset="digits"))
    assert (len(first.train.x), len(first.val.x), len(first.test.x)) == (1257, 180, 360)
    torch.testing.assert_close(first.test.x, again.test.x)
    assert first.train.x.shape[1:] == (1, 8, 8) and first.input_shape == (1, 8, 8)
    assert first.train.x.min() == 0 and first.train.x.max() == 16  # raw pixel counts, not normalized
    rows = {tuple(r.flatten().tolist()) for r in first.test.x}
    assert sum(tuple(r.flatten().tolist()) in rows for r in first.train.x) < 5  # digits has a few duplicates
    assert sorted(torch.bincount(first.test.y).tolist())[0] >= 34  # stratified
    assert first.class_names == tuple(str(i) for i in range(10))


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_a_fake_folder(tmp_path, name, classes):
    folder = write_cifar(tmp_path, name, [40] * 5, 30, classes)
    data = load_dataset(DataConfig(dataset=name, root=str(tmp_path)))
    assert (len(data.train.x), len(data.val.x), len(data.test.x)) == (180, 20, 30)
    assert data.train.x.shape[1:] == (3, 32, 32) and data.train.x.dtype == torch.float32
    assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
    assert len(data.class_names) == classes and data.augment
    assert len(data.mean) == 3 and all(0.4 < m < 0.6 for m in data.mean)
    # pointing at the inner folder works too
    inner = load_dataset(DataConfig(dataset=name, root=str(folder)))
    torch.testing.assert_close(inner.test.x, data.test.x)
    # image layout: row 0 of the file is channel 0 (R) of image 0, pixels in row-major order
    raw = pickle.loads((folder / ("test_batch" if name == "cifar10" else "test")).read_bytes())["data"]
    torch.testing.assert_close(data.test.x[0, 1, 0, :4], torch.tensor(raw[0, 1024:1028] / 255.0, dtype=torch.float32))


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError, match=r"put torchvision's 'cifar-10-batches-py' folder there"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere")))


def test_cifar_file_with_foreign_objects_is_refused(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", [10] * 5, 10, 10)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": torch.zeros(1)}))
    with pytest.raises(DatasetError, match="not a CIFAR batch file"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_truncated_cifar_file(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", [10] * 5, 10, 10)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_augmentation_crops_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape
    padded = torch.nn.functional.pad(x, (4,) * 4)
    for i in range(2):  # every output is a 32x32 window of the padded image, maybe mirrored
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    seen = {tuple(augment_batch(x, torch.Generator().manual_seed(s))[0, 0, 10, 10:12].tolist()) for s in range(10)}
    assert len(seen) > 3
