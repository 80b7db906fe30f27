"""Datasets as in-memory tensors, and a loader that batches (and augments) them on the target device.

* :class:`TensorData`: labelled images in [0, 1] (stored as uint8 or float) with ``.loader(...)``.
* :func:`digits`: scikit-learn's 8x8 digits, the embedded zero-setup dataset (1 channel, [0, 1]).
* :func:`cifar10`: CIFAR-10 from the standard torchvision layout on disk (no download unless asked).
* :func:`cifar10_jpeg`: the CIFAR-10 JPEG ImageFolder archive: extracted once, decoded once with
  Pillow in worker processes, cached as a uint8 tensor file.
* :func:`image_folder`: any ``root/<class>/<image>`` folder of same-sized images.

Augmentation (random crop with zero padding + horizontal flip) runs on the batch's device, so a
dataset moved to the GPU once (``data.to("cuda")``) is never copied back to the host.

Example:
    >>> train, test = digits()
    >>> x, y = next(iter(train.loader(64, train=True)))
    >>> x.shape, x.dtype, bool(x.min() >= 0 and x.max() <= 1)
    (torch.Size([64, 1, 8, 8]), torch.float32, True)
"""

from __future__ import annotations

import lzma
import math
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CstarFileNotFoundError, CstarTypeError, CstarValueError
from .extras import require
from .fileutil import atomic_save

__all__ = [
    "TensorData", "TensorLoader", "DeviceLoader", "as_loader", "digits", "cifar10", "cifar10_jpeg",
    "image_folder", "default_cache_dir", "atomic_save", "CIFAR10_CLASSES",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_AUGMENTS = (None, "crop_flip")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CACHE_FORMAT = "cstar-fx/image-tensor/1"


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: ``$CSTAR_FX_CACHE`` or ``~/.cache/cstar_fx``.

    Example:
        >>> default_cache_dir().name in ("cstar_fx", os.environ.get("CSTAR_FX_CACHE", "cstar_fx").rsplit("/", 1)[-1])
        True
    """
    env = os.environ.get("CSTAR_FX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cstar_fx"


def _crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, rows: tuple[int, int] | None = None) -> torch.Tensor:
    # rows=(offset, total): x holds rows offset.. of a batch of `total`; draw the whole batch's
    # crops and flips and keep ours, so a shard is augmented exactly as in a single process.
    b, _, h, w = x.shape
    dev = x.device
    offset, total = rows if rows is not None else (0, b)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=gen, device=dev)[offset:offset + b]
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=gen, device=dev)[offset:offset + b]
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(total, generator=gen, device=dev)[offset:offset + b] < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class TensorLoader:
    """Batches of a :class:`TensorData` on one device: shuffled and augmented when ``train``.

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``: call ``set_epoch(e)``
    before iterating (as with ``DistributedSampler``) and a resumed run sees the same batches. A
    ``sampler`` (any iterable of indices, e.g. a ``DistributedSampler``) replaces the shuffle.

    ``shard=(rank, world)`` (training only) makes ``batch_size`` the *global* batch of ``world``
    processes: every rank draws the same permutation and yields its ``batch_size // world`` rows of
    each global batch, augmented exactly as a single process would augment them; the remainder of
    each epoch is dropped so every rank runs the same number of steps. With a ``sampler`` as well,
    the sampler yields this rank's indices and batches of ``batch_size // world`` are cut from them.

    Example:
        >>> loader = digits()[0].loader(100, train=True, seed=1)
        >>> loader.set_epoch(3); len(loader)
        13
        >>> [x.shape[0] for x, _ in digits()[0].loader(100, train=True, shard=(1, 4))][:2]
        [25, 25]
    """

    def __init__(self, data: "TensorData", batch_size: int, train: bool, device: torch.device,
                 seed: int = 0, sampler: Iterable[int] | None = None, drop_last: bool | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CstarValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.data, self.batch_size, self.train, self.device = data, batch_size, train, device
        self.seed, self.sampler, self.epoch = seed, sampler, 0
        self.shard = _check_shard(shard, batch_size, train)
        # Under a shard without a sampler every rank must run the same number of full steps.
        drop_last = True if (self.shard is not None and sampler is None) else drop_last
        self.local_batch = batch_size // self.shard[1] if self.shard is not None else batch_size
        step = self.batch_size if sampler is None else self.local_batch
        # A last batch of one sample breaks batch norm in training; drop the remainder by default.
        self.drop_last = (train and len(data) > step) if drop_last is None else drop_last

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation of this epoch (forwarded to the sampler if it has one)."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def _indices(self) -> torch.Tensor:
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.long)
        if not self.train:
            return torch.arange(len(self.data))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.data), generator=gen)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.data)  # type: ignore[arg-type]
        step = self.batch_size if self.sampler is None else self.local_batch
        return n // step if self.drop_last else math.ceil(n / step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch + 1)
        x_all, y_all = self.data.x, self.data.y
        step = self.batch_size if self.sampler is None else self.local_batch
        # Rows of each global batch that are ours (all of them without a shard or with a sampler).
        rows = (self.shard[0] * self.local_batch, self.batch_size) if (self.shard and self.sampler is None) else None
        for i in range(len(self)):
            sel = idx[i * step:(i + 1) * step]
            if rows is not None:
                sel = sel[rows[0]:rows[0] + self.local_batch]
            sel = sel.to(x_all.device)
            x = _to_float(x_all[sel].to(self.device, non_blocking=True))
            y = y_all[sel].to(self.device, non_blocking=True)
            if self.train and self.data.augment == "crop_flip":
                x = _crop_flip(x, self.data.pad, gen, rows)
            yield x, y


def _check_shard(shard: tuple[int, int] | None, batch_size: int, train: bool) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        rank, size = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise CstarValueError(f"shard must be (rank, world_size), got {shard!r}") from None
    if not 0 <= rank < size:
        raise CstarValueError(f"shard {shard!r}: rank must be in [0, world_size)")
    if not train:
        raise CstarValueError("shard= is for training loaders; evaluate() shards an evaluation set itself")
    if batch_size % size:
        raise CstarValueError(f"batch_size={batch_size} is the global batch of {size} processes and must be divisible "
                              f"by {size}; use a multiple of {size} (e.g. {max(size, batch_size // size * size)})")
    return rank, size


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class TensorData:
    """Labelled images in memory: ``x`` (N, C, H, W) uint8 (0-255) or float in [0, 1], ``y`` (N,) int64.

    ``augment="crop_flip"`` applies a random crop (``pad`` pixels of zero padding) and a horizontal
    flip to training batches. uint8 storage keeps CIFAR-10's training set at 150 MB.

    Example:
        >>> data = TensorData(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10) % 2)
        >>> len(data), data.num_classes, data.input_shape
        (10, 2, (3, 4, 4))
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, classes: Sequence[str] | None = None,
                 augment: str | None = None, pad: int = 4) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise CstarValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise CstarTypeError(f"x must be uint8 (0-255) or floating point in [0, 1], got {x.dtype}")
        if x.is_floating_point() and x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise CstarValueError("float images must lie in [0, 1]; normalisation belongs inside the model")
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise CstarValueError(f"y must be (N,) integer labels with N={x.shape[0]}, got {tuple(y.shape)} {y.dtype}")
        if augment not in _AUGMENTS:
            raise CstarValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        self.x, self.y = x, y.long().to(x.device)
        self.classes = tuple(classes) if classes is not None else None
        self.augment, self.pad = augment, int(pad)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (f"TensorData(n={len(self)}, shape={self.input_shape}, dtype={self.x.dtype}, "
                f"classes={self.num_classes}, augment={self.augment!r}, device={self.x.device})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of classes (from ``classes`` when given, else ``max(y) + 1``)."""
        return len(self.classes) if self.classes else int(self.y.max()) + 1 if len(self) else 0

    def _like(self, x: torch.Tensor, y: torch.Tensor) -> "TensorData":
        return TensorData(x, y, classes=self.classes, augment=self.augment, pad=self.pad)

    def subset(self, items: int | Sequence[int] | torch.Tensor) -> "TensorData":
        """The first ``items`` examples (an int) or those at the given indices.

        Example:
            >>> len(digits()[1].subset(100))
            100
        """
        if isinstance(items, int):
            if items < 0:
                raise CstarValueError(f"subset size must be >= 0, got {items}")
            return self._like(self.x[:items], self.y[:items])
        idx = torch.as_tensor(items, dtype=torch.long, device=self.x.device)
        return self._like(self.x[idx], self.y[idx])

    def to(self, device: str | torch.device) -> "TensorData":
        """A copy stored on ``device`` (move a dataset to the GPU once, then batch there).

        Example:
            >>> digits()[1].to("cpu").x.device.type
            'cpu'
        """
        return self._like(self.x.to(device), self.y.to(device))

    def with_augment(self, augment: str | None) -> "TensorData":
        """The same tensors with another augmentation setting.

        Example:
            >>> digits()[0].with_augment("crop_flip").augment
            'crop_flip'
        """
        return TensorData(self.x, self.y, classes=self.classes, augment=augment, pad=self.pad)

    def tensors(self, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs as float in [0, 1] and the labels, on ``device`` (default: where they are stored).

        Example:
            >>> x, y = digits()[1].tensors()
            >>> x.dtype, y.dtype
            (torch.float32, torch.int64)
        """
        device = self.x.device if device is None else device
        return _to_float(self.x.to(device)), self.y.to(device)

    def loader(self, batch_size: int, train: bool = False, device: str | torch.device | None = None, *,
               seed: int = 0, sampler: Iterable[int] | None = None, drop_last: bool | None = None,
               shard: tuple[int, int] | None = None) -> TensorLoader:
        """Batches on ``device``; ``train=True`` shuffles (by ``seed`` and epoch) and augments.

        ``shard=(rank, world)``: this rank's part of each global batch of ``batch_size`` (see :class:`TensorLoader`).

        Example:
            >>> x, y = next(iter(digits()[1].loader(32)))
            >>> x.shape[0], y.shape[0]
            (32, 32)
        """
        device = torch.device(device) if device is not None else self.x.device
        return TensorLoader(self, batch_size, train, device, seed=seed, sampler=sampler, drop_last=drop_last,
                            shard=shard)


class DeviceLoader:
    """Wrap any re-iterable of ``(x, y)`` batches (e.g. a ``DataLoader``) to move each batch to ``device``.

    ``set_epoch`` is forwarded to the wrapped loader's sampler when it has one.

    Example:
        >>> batches = [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))]
        >>> next(iter(DeviceLoader(batches, "cpu")))[0].shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(self, batches: Iterable[Any], device: str | torch.device) -> None:
        self.batches, self.device = batches, torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped loader or its sampler."""
        for obj in (self.batches, getattr(self.batches, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)  # type: ignore[union-attr]
                return

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches:
            x, y = batch[0], batch[1]
            yield _to_float(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


def as_loader(data: Any, batch_size: int, train: bool, device: str | torch.device, *, seed: int = 0,
              sampler: Iterable[int] | None = None, shard: tuple[int, int] | None = None) -> TensorLoader | DeviceLoader:
    """One loader interface for a :class:`TensorData`, an ``(x, y)`` tensor pair or an iterable of batches.

    Anything with a ``.loader(batch_size, train, device, seed=...)`` method is asked for its own loader
    (with ``shard=`` when given: see :class:`TensorLoader`); a re-iterable of batches (a ``DataLoader``,
    a list) is used as is, batches moved to ``device``, and ``shard`` is ignored: such a loader shards
    itself (e.g. with a ``DistributedSampler``).

    Example:
        >>> loader = as_loader((torch.rand(6, 1, 4, 4), torch.arange(6) % 2), 4, True, "cpu")
        >>> [x.shape[0] for x, _ in loader]
        [4]
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorData(data[0], data[1])
    if hasattr(data, "loader"):
        extra = {"shard": shard} if shard is not None else {}
        return data.loader(batch_size, train, device, seed=seed, sampler=sampler, **extra)
    if isinstance(data, Iterator):
        raise CstarTypeError("training data must be re-iterable (a TensorData, a DataLoader or a list of batches), "
                             "not a one-shot iterator or generator")
    if not isinstance(data, Iterable):
        raise CstarTypeError(f"expected a TensorData, an (x, y) tensor pair or an iterable of (x, y) batches, "
                             f"got {type(data).__name__}")
    return DeviceLoader(data, device)


def digits(test_size: float = 0.25, seed: int = 0) -> tuple[TensorData, TensorData]:
    """scikit-learn's 8x8 handwritten digits (1,797 images), split stratified into train and test.

    Pixels (0-16) are scaled to [0, 1]; images are (1, 8, 8); no augmentation.

    Example:
        >>> train, test = digits()
        >>> len(train), len(test), train.input_shape
        (1347, 450, (1, 8, 8))
    """
    datasets, model_selection = require("sklearn.datasets", "sklearn.model_selection", purpose="the digits dataset")
    bunch = datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    i_train, i_test = model_selection.train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=bunch.target)
    classes = tuple(str(c) for c in range(10))
    return (TensorData(x[i_train], y[i_train], classes=classes), TensorData(x[i_test], y[i_test], classes=classes))


def cifar10(root: str | os.PathLike[str], *, download: bool = False, augment: bool = True) -> tuple[TensorData, TensorData]:
    """CIFAR-10 from the standard torchvision layout (``root/cifar-10-batches-py``) as uint8 tensors.

    Nothing is downloaded unless ``download=True``. The training split gets crop+flip augmentation
    when ``augment``.

    Example:
        >>> train, test = cifar10("~/data")  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (50000, 10000)
    """
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except RuntimeError as exc:
            raise CstarFileNotFoundError(
                f"CIFAR-10 not found under {root} (expected {root / 'cifar-10-batches-py'}): {exc}. "
                "Point root= at the folder holding cifar-10-batches-py, or pass download=True.") from None
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(TensorData(x, torch.tensor(ds.targets, dtype=torch.long), classes=tuple(ds.classes),
                                 augment="crop_flip" if (train and augment) else None))
    return splits[0], splits[1]


def _decode_chunk(paths: list[str]) -> np.ndarray:
    (image,) = require("PIL.Image", purpose="reading image files")
    out = []
    for p in paths:
        try:
            with image.open(p) as img:
                out.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise CstarValueError(f"cannot read the image {p} ({' '.join(str(exc).split()) or type(exc).__name__}); "
                                  "remove or replace it") from None
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def _list_folder(root: Path, per_class: int | None) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise CstarFileNotFoundError(f"no class folders under {root}; expected the layout root/<class>/<image>")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        files = files[:per_class] if per_class is not None else files
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise CstarFileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) found under {root}/<class>/")
    return paths, labels, classes


def _load_cached(path: Path | None, augment: str | None) -> TensorData | None:
    if path is None or not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
        return None  # not ours or an older format: decode again and overwrite
    return TensorData(blob["x"], blob["y"], classes=blob["classes"], augment=augment)


def image_folder(root: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None,
                 per_class: int | None = None, processes: int | None = None,
                 augment: str | None = None, progress: bool = True) -> TensorData:
    """Decode an ImageFolder tree (``root/<class>/<image>``, classes sorted) into a uint8 :class:`TensorData`.

    All images must share one size. Decoding uses ``processes`` Pillow workers (default: all CPUs);
    with ``cache`` the tensors are saved there once (atomically) and loaded from it afterwards.
    ``per_class`` keeps only the first N files (sorted) of each class.

    Example:
        >>> data = image_folder("cifar10-jpeg/test", cache="/tmp/test.pt")  # doctest: +SKIP
        >>> data.x.dtype  # doctest: +SKIP
        torch.uint8
    """
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise CstarValueError(f"per_class must be an int >= 1 or None, got {per_class!r}")
    cache_path = Path(cache) if cache is not None else None
    cached = _load_cached(cache_path, augment)
    if cached is not None:
        return cached
    root = Path(root)
    if not root.is_dir():
        raise CstarFileNotFoundError(f"image folder {root} does not exist")
    paths, labels, classes = _list_folder(root, per_class)
    workers = max(1, min(processes or os.cpu_count() or 1, 16))
    chunk = max(1, math.ceil(len(paths) / (workers * 8)))
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), desc=f"decode {root.name}", unit="img", disable=not progress)
    arrays = []
    try:
        if workers == 1:
            for c in chunks:
                arrays.append(_decode_chunk(c))
                bar.update(len(c))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for c, arr in zip(chunks, pool.map(_decode_chunk, chunks)):
                    arrays.append(arr)
                    bar.update(len(c))
    finally:
        bar.close()  # also on an error, so that the bar's line ends before the error is reported
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise CstarValueError(f"images under {root} have different sizes "
                              f"{sorted(shapes)}; resize them to one size first")
    x = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.long)
    if cache_path is not None:
        atomic_save({"format": _CACHE_FORMAT, "x": x, "y": y, "classes": list(classes)}, cache_path)
    return TensorData(x, y, classes=classes, augment=augment)


def _default_archive() -> Path:
    env = os.environ.get("CSTAR_FX_CIFAR10_JPEG")
    if env:  # an explicit choice: never silently replaced by an archive found elsewhere
        if not Path(env).is_file():
            raise CstarFileNotFoundError(f"CSTAR_FX_CIFAR10_JPEG={env} does not exist; point it at "
                                         "cifar10-jpeg.tar.xz or unset it")
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd() / "../shared/data/cifar10-jpeg.tar.xz", here / "../shared/data/cifar10-jpeg.tar.xz"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise CstarFileNotFoundError("cifar10-jpeg.tar.xz not found (looked in: " + ", ".join(map(str, candidates))
                                 + "); pass archive=PATH or set CSTAR_FX_CIFAR10_JPEG")


def _extract_once(archive: Path, dest: Path) -> Path:
    marker = dest / ".extracted"
    if marker.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:  # not an archive, or cut short
            reason = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
            raise CstarValueError(f"{archive} is not a readable .tar.xz archive ({reason}); pass "
                                  "cifar10-jpeg.tar.xz") from None
        marker_tmp = tmp / ".extracted"
        marker_tmp.write_text(str(archive))
        if dest.exists():
            shutil.rmtree(dest)  # a partial extraction from an interrupted run
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cifar10_jpeg(archive: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                 per_class: int | tuple[int | None, int | None] | None = None, processes: int | None = None,
                 augment: bool = True, progress: bool = True) -> tuple[TensorData, TensorData]:
    """CIFAR-10 (JPEG q75) from the ImageFolder archive ``cifar10-jpeg.tar.xz``: ``(train, test)``.

    The archive (default: ``$CSTAR_FX_CIFAR10_JPEG`` when set, which must then exist, else
    ``../shared/data/cifar10-jpeg.tar.xz``) is extracted once under ``cache_dir`` (default
    :func:`default_cache_dir`), each split decoded once and cached as a uint8 tensor file. ``per_class`` (one int, or ``(train, test)``) keeps the first
    N images of each class, for smoke runs. The training split gets crop+flip augmentation.

    Example:
        >>> train, test = cifar10_jpeg(per_class=(30, 20))  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (300, 200)
    """
    archive = Path(archive) if archive is not None else _default_archive()
    if not archive.is_file():
        raise CstarFileNotFoundError(f"archive {archive} does not exist")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    per_train, per_test = per_class if isinstance(per_class, tuple) else (per_class, per_class)
    stem = archive.name.split(".")[0]
    splits = []
    for split, per in (("train", per_train), ("test", per_test)):
        name = f"{stem}-{split}" + (f"-{per}pc" if per else "") + ".pt"
        cache_file = cache / name
        data = _load_cached(cache_file, None)
        if data is None:
            root = _extract_once(archive, cache / stem)
            inner = root / stem if (root / stem).is_dir() else root
            data = image_folder(inner / split, cache=cache_file, per_class=per, processes=processes, progress=progress)
        splits.append(data.with_augment("crop_flip" if (split == "train" and augment) else None))
    return splits[0], splits[1]
