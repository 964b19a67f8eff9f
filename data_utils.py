"""Datasets as uint8 tensors on the training device, and batch-level augmentation there.

A dataset is a row of `DATASETS` plus `load_dataset`, which returns uint8 images (N, C, H, W)
and int64 labels. Parsing and downloading go through torchvision's dataset classes; Fashion-MNIST
also reads the raw idx files directly (the Debian package `dataset-fashion-mnist` puts them in
one folder), which is how a machine without internet gets real data.

`TrainLoader` makes whole augmented batches on the device: seeded shuffle, random crop with
padding (constant fill or reflect), horizontal flip, Cutout (two forms, below), normalisation.
No per-image Python work, except with AutoAugment, which runs torchvision's policy per sample in a
CPU DataLoader with workers (each sample under a seed of its own: the number of workers does not
change results) and finishes the batch on the device.

Cutout forms (both: one square hole, box start s ~ U{-⌊L/2⌋, ..., H-⌊L/2⌋-1} per axis, clipped):
- ``amp`` (DeVries & Taylor; AMP code): side 2⌊L/2⌋, pixels set to black *before* normalisation.
- ``rwp`` (RWP code): side L, pixels set to 0 *after* normalisation (i.e. to the mean).
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    size: int
    mean: tuple  # per channel, in [0, 1] pixel units
    std: tuple


DATASETS = {
    # CIFAR / SVHN statistics as in the AMP code (x / 255 of the 8-bit values).
    "cifar10": DatasetInfo(10, 3, 32, (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": DatasetInfo(100, 3, 32, (129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255)),
    "svhn": DatasetInfo(10, 3, 32, (109.9 / 255, 109.7 / 255, 113.8 / 255), (50.1 / 255, 50.6 / 255, 50.8 / 255)),
    # The SAM paper's Fashion-MNIST normalisation.
    "fashionmnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,)),
    # Random tensors of CIFAR shape, for benchmarks (timings do not depend on pixel values).
    "synthetic": DatasetInfo(10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    # ImageFolder files streamed by data_folder.py; the Trainer takes the class count from the train
    # folders and the size from --image_size (1000 and 224 stand in for the config checks).
    # Mean/std of the official script's transforms.Normalize.
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DataError(Exception):
    """Data missing or unreadable; the message is one line that says how to fix it."""


def _missing(dataset: str, data_dir: str, where: str, download_error: Exception | None = None) -> DataError:
    if download_error is not None:
        lines = str(download_error).strip().splitlines()  # the short reason: the last line
        return DataError(
            f"{dataset}: download failed ({lines[-1] if lines else type(download_error).__name__}); "
            f"put {where} into {data_dir!r} (--data_dir) by hand")
    return DataError(
        f"{dataset} not found in {data_dir!r}: either run with --download (needs internet), "
        f"or put {where} into {data_dir!r} (--data_dir)")


def _read_idx(path: str) -> np.ndarray:
    """Parse an idx file (optionally .gz): big-endian magic 0x0000 0x08 ndim, dims, uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except EOFError:
        raise DataError(f"{path} is truncated (the compressed data ends early)") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or unreadable ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(tuple(dims))


def _find_idx(folder: str, stem: str):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _fashion_mnist(data_dir: str, train: bool, download: bool):
    """(images, labels, the folder read)."""
    prefix = "train" if train else "t10k"
    # Flat idx folders first: the one given, then the Debian package's (only when the one given holds
    # none of the four files: a partial copy is an error, never completed from elsewhere).
    pair = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if any(_find_idx(data_dir, f"{p}-{k}") for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        missing = [s + "(.gz)" for s in pair if not _find_idx(data_dir, s)]
        if missing:
            raise DataError(f"fashionmnist: {data_dir!r} holds idx files but not {' and '.join(missing)}; "
                            f"put all four there (--data_dir)")
    for folder in (data_dir, DEBIAN_FASHION_MNIST):
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x, y = _read_idx(images), _read_idx(labels)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (y.size and y.max() >= 10):
                raise DataError(f"fashionmnist: {images} and {labels} do not fit (images {tuple(x.shape)}, labels "
                                f"{tuple(y.shape)} up to {int(y.max()) if y.size else None}); expected N images and N labels 0..9")
            return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), os.path.abspath(folder)
    from torchvision import datasets
    try:  # torchvision's layout: data_dir/FashionMNIST/raw/
        with _UndoOnFailure(data_dir) if download else contextlib.nullcontext():
            ds = datasets.FashionMNIST(data_dir, train=train, download=download)
    except (RuntimeError, OSError) as e:  # OSError: urllib's URLError, ConnectionError
        if isinstance(e, OSError) and not download:
            raise
        raise _missing("fashionmnist", data_dir, "the four idx files (train-images-idx3-ubyte.gz, ...) "
                       "or install the Debian package dataset-fashion-mnist, then put them",
                       e if download else None) from None
    return ds.data.unsqueeze(1).clone(), ds.targets.clone().long(), os.path.abspath(ds.raw_folder)


class _UndoOnFailure:
    """Context manager: when the block raises, remove what it created under `folder` (the folder
    itself and missing parents too, if it did not exist): a failed download leaves nothing behind."""

    def __init__(self, folder: str):
        path = os.path.abspath(folder)
        self.first_missing = None  # the topmost folder that does not exist yet
        while not os.path.exists(path) and os.path.dirname(path) != path:
            self.first_missing, path = path, os.path.dirname(path)
        self.folder, self.before = os.path.abspath(folder), self._entries(folder)

    @staticmethod
    def _entries(top):
        found = set()
        for where, dirs, files in os.walk(top):
            found.update(os.path.join(os.path.abspath(where), name) for name in dirs + files)
        return found

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            return False
        if self.first_missing is not None:
            shutil.rmtree(self.first_missing, ignore_errors=True)
        else:
            for path in sorted(self._entries(self.folder) - self.before, key=len, reverse=True):
                try:
                    os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
                except OSError:
                    pass
        return False


def _torchvision(dataset: str, data_dir: str, train: bool, download: bool):
    from torchvision import datasets
    try:
        with _UndoOnFailure(data_dir) if download else contextlib.nullcontext():
            if dataset == "svhn":  # core training set only, as in the AMP code
                ds = datasets.SVHN(data_dir, split="train" if train else "test", download=download)
                return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
            cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
            ds = cls(data_dir, train=train, download=download)
    except (RuntimeError, OSError) as e:  # OSError: urllib's URLError, ConnectionError
        if isinstance(e, OSError) and not download:
            raise
        there = os.path.join(data_dir, {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                                        "svhn": f"{'train' if train else 'test'}_32x32.mat"}[dataset])
        if not download and os.path.exists(there):  # (present, but torchvision's md5 check failed)
            raise DataError(f"{dataset}: {there} is corrupt or incomplete (it fails torchvision's md5 check); "
                            f"put the original files there, or run with --download") from None
        folder = {"cifar10": "the extracted cifar-10-batches-py/ folder",
                  "cifar100": "the extracted cifar-100-python/ folder",
                  "svhn": "train_32x32.mat and test_32x32.mat"}[dataset]
        raise _missing(dataset, data_dir, folder, e if download else None) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def load_dataset(dataset: str, data_dir: str, train: bool, download: bool = False,
                 size: int = 0, seed: int = 0, with_source: bool = False):
    """Return (uint8 images (N, C, H, W), int64 labels (N,)) on the CPU; `size` > 0 keeps the first N.
    With `with_source`, a third item says where the data came from: the absolute path of the folder
    read (Fashion-MNIST falls back to the Debian package's folder), or 'synthetic (seed S)'."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset == "synthetic":
        info = DATASETS[dataset]
        n = size or (50000 if train else 10000)
        g = torch.Generator().manual_seed(seed * 2 + int(train))
        x = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, info.num_classes, (n,), generator=g)
        return (x, y, f"synthetic (seed {seed})") if with_source else (x, y)
    if dataset == "imagenet":
        raise DataError("imagenet is streamed from its files (data_folder.FolderData), not loaded whole")
    if dataset == "fashionmnist":
        x, y, source = _fashion_mnist(data_dir, train, download)
    else:
        if not download and not os.path.isdir(data_dir):
            raise _missing(dataset, data_dir, "the dataset files")
        x, y = _torchvision(dataset, data_dir, train, download)
        source = os.path.abspath(data_dir)
    if size:
        x, y = x[:size], y[:size]
    return (x.contiguous(), y, source) if with_source else (x.contiguous(), y)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, stream, shard ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0]) >> 1


def _sample_seed(base: int, i: int) -> int:
    """A 63-bit seed for sample i from a 63-bit base: splitmix64 of base + (i + 1)·golden ratio
    (cheap, and all 64 bits mixed: torch's CPU generator keeps only the low 32 of a seed)."""
    m = (1 << 64) - 1
    z = (base + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 1


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Augment:
    """Batch augmentation on the device: x uint8 (B, C, H, W) → normalised float (B, C, H, W).

    crop:   pad by `padding` (constant `fill` in 0..255, or reflect), random crop back to H×W
    flip:   horizontal flip with probability 1/2
    cutout: one hole of side `cutout_size` with probability `cutout_prob` (`cutout_style` amp|rwp)
    """

    def __init__(self, mean, std, *, crop=False, padding=4, pad_mode="constant", fill=0, flip=False,
                 cutout_size=0, cutout_prob=1.0, cutout_style="amp"):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.crop, self.padding, self.pad_mode, self.fill = crop and padding > 0, padding, pad_mode, fill
        self.flip = flip
        self.cutout_size, self.cutout_prob, self.cutout_style = cutout_size, cutout_prob, cutout_style

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() - mean) / std

    def __call__(self, x: torch.Tensor, g: torch.Generator, geometric: bool = True) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        if geometric and (self.crop or self.flip):
            x = self._crop_flip(x, g)
        if self.cutout_size > 0 and self.cutout_style == "amp":
            x = x.masked_fill(self._hole(b, h, w, g, dev), 0)  # black, before normalising
        x = self.normalize(x)
        if self.cutout_size > 0 and self.cutout_style == "rwp":
            x = x.masked_fill_(self._hole(b, h, w, g, dev), 0.0)  # zero, after normalising
        return x

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop of the padded image and random flip as one gather on the uint8 pixels.

        Output pixel (i, j) of image k is source pixel (dy_k + i − p, dx_k + j' − p) with
        j' = w − 1 − j when image k is flipped, else j; off-image coordinates take the constant
        `fill` (via a padded copy) or are reflected about the border (−q ↦ q, h − 1 + q ↦ h − 1 − q).
        """
        b, c, h, w = x.shape
        dev = x.device
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.crop:
            p = self.padding
            rows = rows + torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=dev) - p
            cols = cols + torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=dev) - p
        if self.flip:
            flip = torch.rand(b, 1, 1, 1, generator=g, device=dev) < 0.5
            cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
        hs, ws = h, w
        if self.crop and self.pad_mode == "reflect":
            rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
            cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        elif self.crop:
            p = self.padding
            x = F.pad(x, (p, p, p, p), value=self.fill)
            rows, cols, hs, ws = rows + p, cols + p, h + 2 * p, w + 2 * p
        idx = (rows.view(b, h, 1) * ws + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, hs * ws).gather(2, idx).view(b, c, h, w)

    def _hole(self, b, h, w, g, dev) -> torch.Tensor:
        """(B, 1, H, W) bool: the Cutout square (clipped at the border), one per image."""
        half = self.cutout_size // 2
        side = 2 * half if self.cutout_style == "amp" else self.cutout_size
        y0 = torch.randint(-half, h - half, (b, 1, 1, 1), generator=g, device=dev)
        x0 = torch.randint(-half, w - half, (b, 1, 1, 1), generator=g, device=dev)
        r = torch.arange(h, device=dev).view(1, 1, h, 1)
        c = torch.arange(w, device=dev).view(1, 1, 1, w)
        hole = ((r >= y0) & (r < y0 + side)) & ((c >= x0) & (c < x0 + side))
        if self.cutout_prob < 1:
            hole = hole & (torch.rand(b, 1, 1, 1, generator=g, device=dev) < self.cutout_prob)
        return hole


class TrainLoader:
    """One epoch of augmented training batches from uint8 tensors on `device`.

    Shuffling: a permutation of all N samples drawn from (seed, epoch, stream); under torchrun the
    ranks of one stream split it into `num_shards` shards. Different streams (RWP's clean and
    perturbed batches) shuffle independently. Every epoch is reproducible from (seed, epoch).
    The last partial batch is kept unless it would hold a single sample (BatchNorm needs two), or
    dropped with `drop_last` (as the SAM code's tf.data `batch(drop_remainder=True)`).
    """

    def __init__(self, images, labels, batch_size, augment: Augment, *, device, seed=0, stream=0,
                 shard=0, num_shards=1, autoaugment=None, policy_first=False, workers=0, drop_last=False):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.augment, self.device = batch_size, augment, torch.device(device)
        self.seed, self.stream, self.shard, self.num_shards = seed, stream, shard, num_shards
        self.autoaugment, self.policy_first, self.workers = autoaugment, policy_first, workers
        self.epoch = 0
        n = len(self.images) // num_shards
        self.num_samples = n
        self.num_batches = n // batch_size + (1 if n % batch_size > 1 and not drop_last else 0)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches

    def _indices(self) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.stream))
        perm = torch.randperm(len(self.images), generator=g, device=self.device)
        return perm[self.shard::self.num_shards][: self.num_samples]

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator(device=self.device).manual_seed(
            mix_seed(self.seed, self.epoch, self.stream, self.shard, 1))
        if self.autoaugment is not None:
            yield from self._iter_autoaugment(idx, g)
            return
        for i in range(self.num_batches):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.augment(self.images[j], g), self.labels[j]

    def _iter_autoaugment(self, idx, g):
        """Crop, flip and AutoAugment per sample on the CPU (workers), the rest on the device.

        Sample i is transformed under its own seed from (seed, epoch, stream, shard, i), so the
        result depends neither on the number of workers nor on the global RNG (left untouched);
        workers are capped at the CPU count (more would only compete for the same cores)."""
        from torch.utils.data import DataLoader
        base = mix_seed(self.seed, self.epoch, self.stream, self.shard, 2)
        ds = _PolicyDataset(self.images.cpu(), self.augment, self.autoaugment, base, self.policy_first)
        batches = [idx[i * self.batch_size:(i + 1) * self.batch_size].cpu().tolist()
                   for i in range(self.num_batches)]
        # the generator keeps DataLoader from drawing its worker seed (now irrelevant) from the global RNG
        dl = DataLoader(ds, batch_sampler=batches, num_workers=min(self.workers, _cpu_count()),
                        generator=torch.Generator().manual_seed(base),
                        pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, j in dl:
            x = x.to(self.device, non_blocking=True)
            j = j.to(self.device, non_blocking=True)
            yield self.augment(x, g, geometric=False), self.labels[j]


class _PolicyDataset(torch.utils.data.Dataset):
    """uint8 image i → (crop + flip + AutoAugment policy) uint8 image, i. Per sample, for workers.
    With `policy_first` the policy comes before crop and flip (google-research/sam's order).

    torchvision's transforms draw from the global CPU RNG: each sample runs them on a fork of it
    seeded from (`base`, i), so the same sample gets the same draws in any process."""

    def __init__(self, images, augment: Augment, policy, base: int, policy_first=False):
        from torchvision import transforms
        ops = []
        if augment.crop:
            ops.append(transforms.RandomCrop(images.shape[-1], padding=augment.padding,
                                             fill=augment.fill, padding_mode=augment.pad_mode))
        if augment.flip:
            ops.append(transforms.RandomHorizontalFlip())
        ops = [policy, *ops] if policy_first else [*ops, policy]
        self.images, self.transform, self.base = images, transforms.Compose(ops), base

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):  # CPU only: no CUDA state is read or reseeded
            torch.default_generator.manual_seed(_sample_seed(self.base, i))
            return self.transform(self.images[i]), i


def autoaugment_policy(dataset: str, fill: int, channels: int, name: str = "torchvision"):
    """torchvision's AutoAugment with the policy searched for this dataset (CIFAR-10's otherwise), or
    with `name` "sam" the SAM code's own AutoAugment (sam_autoaugment.py: its CIFAR policy, SVHN's for
    svhn; grey 128 fill whatever `fill` says; RGB only)."""
    if name == "sam":
        from sam_autoaugment import SamAutoAugment
        return SamAutoAugment("svhn" if dataset == "svhn" else "cifar")
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy
    policy = AutoAugmentPolicy.SVHN if dataset == "svhn" else AutoAugmentPolicy.CIFAR10
    return AutoAugment(policy, fill=[fill] * channels)


def test_batches(images, labels, batch_size, augment: Augment, *, device, shard=0, num_shards=1):
    """Normalised, un-augmented batches of this rank's shard of the test set (order fixed)."""
    images, labels = images[shard::num_shards], labels[shard::num_shards]
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True)
        yield augment.normalize(x), labels[i:i + batch_size].to(device, non_blocking=True)
