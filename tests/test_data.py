"""Datasets and the tensor loader: digits, ImageFolder/JPEG archives with a cache, torchvision CIFAR-10 layout."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cstar_fx import data as D
from cstar_fx.data import TensorData, as_loader, cifar10, cifar10_jpeg, digits, image_folder


def test_digits_is_an_instant_stratified_split_in_unit_range() -> None:
    train, test = digits()
    assert (len(train), len(test)) == (1347, 450)
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    x, y = train.tensors()
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    counts = torch.bincount(test.y, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47  # stratified (class sizes 174-183)
    again, _ = digits()
    assert torch.equal(again.x, train.x)


def test_loader_covers_every_example_once_and_is_seeded_per_epoch() -> None:
    data = TensorData(torch.rand(50, 1, 4, 4), torch.arange(50))
    loader = data.loader(8, train=True, seed=3)
    assert loader.drop_last and len(loader) == 6

    def epoch(e: int) -> list[int]:
        loader.set_epoch(e)
        return torch.cat([y for _, y in loader]).tolist()

    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)
    assert len(set(epoch(2))) == 48
    ordered = torch.cat([y for _, y in data.loader(8)]).tolist()
    assert ordered == list(range(50))  # evaluation: every example, in order


def test_crop_flip_yields_a_crop_of_the_padded_image_or_its_mirror() -> None:
    img = torch.arange(1, 3 * 6 * 6 + 1, dtype=torch.float32).view(1, 3, 6, 6) / (3 * 6 * 6)
    data = TensorData(img.repeat(16, 1, 1, 1), torch.zeros(16, dtype=torch.long), augment="crop_flip", pad=2)
    x, _ = next(iter(data.loader(16, train=True, drop_last=False)))
    padded = torch.nn.functional.pad(img[0], (2, 2, 2, 2))
    crops = [padded[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
    crops += [c.flip(2) for c in crops]
    found = [any(torch.equal(a, c) for c in crops) for a in x]
    assert all(found)
    assert len({tuple(a.flatten().tolist()) for a in x}) > 1  # not the same crop every time


def test_tensor_data_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="normalisation belongs inside the model"):
        TensorData(torch.full((2, 1, 2, 2), 2.0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        TensorData(torch.rand(2, 1, 2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="augment"):
        TensorData(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), augment="mixup")
    with pytest.raises(TypeError, match="re-iterable"):
        as_loader(iter([(torch.rand(1, 1, 2, 2), torch.tensor([0]))]), 1, True, "cpu")


def test_uint8_storage_becomes_float_batches_in_unit_range() -> None:
    data = TensorData(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), torch.tensor([0]))
    x, _ = next(iter(data.loader(1)))
    assert x.dtype == torch.float32 and x.flatten().tolist() == [0.0, 1.0]


def _jpeg_archive(tmp_path: Path, per_class: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "src" / "cifar10-jpeg"
    for split in ("train", "test"):
        for cls in ("bird", "airplane"):  # sorted order must decide the labels
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg", quality=75)
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="cifar10-jpeg")
    return archive


def test_cifar10_jpeg_extracts_decodes_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _jpeg_archive(tmp_path, per_class=5)
    cache = tmp_path / "cache"
    train, test = cifar10_jpeg(archive, cache_dir=cache, processes=2, progress=False)
    assert (len(train), len(test)) == (10, 10)
    assert train.x.dtype == torch.uint8 and train.input_shape == (3, 32, 32)
    assert train.classes == ("airplane", "bird") and train.y.tolist() == [0] * 5 + [1] * 5
    assert train.augment == "crop_flip" and test.augment is None
    from PIL import Image

    first = np.array(Image.open(cache / "cifar10-jpeg" / "cifar10-jpeg" / "train" / "airplane" / "0000.jpg").convert("RGB"))
    assert torch.equal(train.x[0], torch.from_numpy(first).permute(2, 0, 1))

    def no_decoding(paths: list[str]) -> np.ndarray:
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(D, "_decode_chunk", no_decoding)
    train2, _ = cifar10_jpeg(archive, cache_dir=cache, processes=1, progress=False)
    assert torch.equal(train2.x, train.x)
    monkeypatch.undo()
    small, _ = cifar10_jpeg(archive, cache_dir=cache, per_class=(2, 1), processes=1, progress=False)
    assert len(small) == 4 and small.y.tolist() == [0, 0, 1, 1]


def test_image_folder_reports_missing_or_mixed_inputs(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope", progress=False)
    for cls, size in (("a", 8), ("b", 9)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (size, size)).save(tmp_path / "imgs" / cls / "x.png")
    with pytest.raises(ValueError, match="different sizes"):
        image_folder(tmp_path / "imgs", processes=1, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CSTAR_FX_CIFAR10_JPEG", raising=False)
        mp.chdir(tmp_path)
        mp.setattr(D, "__file__", str(tmp_path / "x" / "data.py"))
        with pytest.raises(FileNotFoundError, match="pass archive=PATH"):
            cifar10_jpeg()
        mp.setattr(D, "__file__", str(tmp_path / "repo" / "cstar_fx" / "data.py"))
        (tmp_path / "shared" / "data").mkdir(parents=True)
        (tmp_path / "shared" / "data" / "cifar10-jpeg.tar.xz").write_bytes(b"")  # the fall-back location
        mp.setenv("CSTAR_FX_CIFAR10_JPEG", str(tmp_path / "missing.tar.xz"))
        with pytest.raises(FileNotFoundError, match="CSTAR_FX_CIFAR10_JPEG=.*missing.tar.xz does not exist"):
            cifar10_jpeg()  # a wrong setting is an error, not a silent switch to the archive found elsewhere


def _fake_cifar(root: Path, n: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CIFAR10_CLASSES)}, f)


def test_cifar10_torchvision_layout_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    def no_network(self: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(CIFAR10, "download", no_network)
    with pytest.raises(FileNotFoundError, match="download=True"):
        cifar10(tmp_path)
    _fake_cifar(tmp_path, n=4)
    # Fake files do not match the official checksums.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    train, test = cifar10(tmp_path)
    assert (len(train), len(test)) == (20, 4)
    assert train.x.dtype == torch.uint8 and train.input_shape == (3, 32, 32)
    assert train.classes == D.CIFAR10_CLASSES and train.augment == "crop_flip" and test.augment is None
