"""Folder datasets (ImageNet's ImageFolder layout) streamed from image files, for `--dataset imagenet`.

Layout: DATA/train/<class>/<image> and DATA/val/<class>/<image>; the classes are the train folders
(sorted), so the class count follows the data (ImageNet 1000, Imagenette 10, TinyImageNet 200 ...).
Nothing is held in memory but the file names (one NumPy byte-string array).

Training batches (`FolderTrainLoader`, the interface of data_utils.TrainLoader: set_epoch, __len__,
__iter__ / iter_from yielding normalised device batches): DataLoader worker processes each build a whole
batch — decode, RandomResizedCrop, resize — and send it as uint8 (B, H, W, 3); the batch is pinned
(CUDA), copied with non_blocking, flipped and normalised on the device. Sample i of an epoch draws its
crop and flip from its own seed, a function of (seed, epoch, stream, shard, i) (data_utils._sample_seed),
so results do not depend on the worker count, and a mid-epoch resume starts at any batch without
decoding the ones before it.

RandomResizedCrop is torchvision's (scale (0.08, 1), ratio (3/4, 4/3), ten tries, then the centre crop of
the clamped ratio): the crop box (i, j, h, w) from the image size in the file header, then one
antialiased bilinear resize of that box to S×S (PIL's resize with `box`). JPEGs are decoded at reduced
DCT size (PIL's `Image.draft`: 1/2, 1/4 or 1/8) when the box still has at least S pixels a side there,
i.e. the decode never goes below the resolution the resize keeps. Grayscale, CMYK and palette images,
and PNGs named .JPEG (all in ImageNet), are converted to RGB as torchvision's ImageFolder loader does.

Validation (`FolderData.test_batches`): resize the shorter side to R = round(S·256/224), centre-crop
S×S (torchvision Resize(R) + CenterCrop(S), done as one resize of the matching box), streamed in
batches, rank r of W taking samples r, r+W, ...: every sample counted once.

An unreadable image (corrupt, truncated, not an image) is reported with its path on stderr and
replaced by the next readable sample in file order (same seed: deterministic); the epoch's metrics row
counts the replacements (`bad_images`).
"""
from __future__ import annotations

import math
import os
import random
import sys

import numpy as np
import torch

from data_utils import DataError, _cpu_count, _sample_seed, mix_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official script's transforms.Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.datasets.folder.IMG_EXTENSIONS
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
MAX_REPLACEMENTS = 16  # consecutive unreadable files before the run stops with an error


def _list_split(root: str, split: str):
    """(class names, relative paths 'class/file' as bytes, labels) of root/split, checked."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"imagenet: no {split}/ folder in {root!r}; expected {root}/train/<class>/*.JPEG "
                        f"and {root}/val/<class>/*.JPEG (--data_dir)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"imagenet: {folder} has no class folders; expected {folder}/<class>/*.JPEG")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(os.path.join(folder, name))
                       if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        if not files:
            raise DataError(f"imagenet: class folder {os.path.join(folder, name)} holds no image "
                            f"({', '.join(EXTENSIONS)})")
        paths += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    return classes, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)


def _subset(n: int, size: int) -> np.ndarray:
    """`size` indices spread evenly over 0..n-1 (every class keeps its share); all when size is 0."""
    if not size or size >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))


class FolderData:
    """The train and val file lists of an ImageFolder tree, and the validation stream."""

    def __init__(self, root: str, train_size: int = 0, test_size: int = 0):
        self.root = root
        self.classes, train_paths, train_labels = _list_split(root, "train")
        val_classes, val_paths, val_labels = _list_split(root, "val")
        if val_classes != self.classes:
            missing = sorted(set(self.classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(self.classes))
            parts = ([f"missing in val: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] * bool(missing)
                     + [f"not in train: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")] * bool(extra))
            raise DataError(f"imagenet: the class folders of val/ differ from train/'s ({'; '.join(parts)})")
        keep = _subset(len(train_paths), train_size)
        self.train = (os.path.join(root, "train"), train_paths[keep], train_labels[keep])
        keep = _subset(len(val_paths), test_size)
        self.val = (os.path.join(root, "val"), val_paths[keep], val_labels[keep])

    @classmethod
    def shared(cls, root: str, train_size: int = 0, test_size: int = 0):
        """FolderData listed once, by rank 0, and broadcast to every process under torch.distributed
        (64 processes each listing ImageNet's 1.3M files would load a shared file system 64 times
        over); a DataError there is raised on every rank."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls(root, train_size, test_size)
        box = [None]
        if dist.get_rank() == 0:
            try:
                box = [cls(root, train_size, test_size)]
            except DataError as e:
                box = [str(e)]
        dist.broadcast_object_list(box, 0)
        if isinstance(box[0], str):
            raise DataError(box[0])
        return box[0]

    @property
    def num_classes(self):
        return len(self.classes)

    def test_batches(self, batch_size, image_size, augment, *, device, shard=0, num_shards=1, workers=0):
        """Normalised validation batches of this rank's samples (shard, shard + num_shards, ...)."""
        folder, paths, labels = self.val
        mine = np.arange(shard, len(paths), num_shards)
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        ds = _Batches(folder, paths, labels, batches, image_size, train=False)
        for x, y, _flip, bad in _loader(ds, range(len(batches)), workers, device):
            _report(bad)
            yield augment.normalize(_to_nchw(x, device)), y.to(device, non_blocking=True)


class FolderTrainLoader:
    """One epoch of augmented training batches from a folder dataset (data_utils.TrainLoader's
    interface and sharding: permutation from (seed, epoch, stream), rank shard::num_shards of it;
    the last partial batch is kept unless it would hold a single sample)."""

    def __init__(self, data: FolderData, batch_size, image_size, augment, *, device, seed=0, stream=0,
                 shard=0, num_shards=1, workers=0, random_crop=True, flip=True):
        self.folder, self.paths, self.labels = data.train
        self.batch_size, self.image_size, self.augment = batch_size, image_size, augment
        self.device = torch.device(device)
        self.seed, self.stream, self.shard, self.num_shards = seed, stream, shard, num_shards
        self.workers, self.random_crop, self.flip = workers, random_crop, flip
        self.epoch, self.bad_images = 0, 0
        n = len(self.paths) // num_shards
        self.num_samples = n
        self.num_batches = n // batch_size + (1 if n % batch_size > 1 else 0)

    def set_epoch(self, epoch: int):
        self.epoch, self.bad_images = epoch, 0

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        return self.iter_from(0)

    def _indices(self) -> np.ndarray:
        perm = np.random.default_rng(mix_seed(self.seed, self.epoch, self.stream)).permutation(len(self.paths))
        return perm[self.shard::self.num_shards][: self.num_samples]

    def iter_from(self, start: int):
        """Batches start, start + 1, ... of this epoch (the earlier ones are not decoded)."""
        idx = self._indices()
        batches = [idx[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.num_batches)]
        base = mix_seed(self.seed, self.epoch, self.stream, self.shard, 2)
        ds = _Batches(self.folder, self.paths, self.labels, batches, self.image_size, train=self.random_crop,
                      base=base, flip=self.flip)
        for x, y, flip, bad in _loader(ds, range(start, self.num_batches), self.workers, self.device):
            self.bad_images += len(bad)
            _report(bad)
            x = _to_nchw(x, self.device)
            if self.flip:
                flip = flip.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(3), x)
            yield self.augment.normalize(x), y.to(self.device, non_blocking=True)


def _to_nchw(x, device):
    """uint8 (B, H, W, 3) → (B, 3, H, W) on the device (a view: channels-last memory)."""
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2)


def _report(bad):
    for path, error, other in bad:
        print(f"data: unreadable image {path} ({error}); replaced by {other}", file=sys.stderr, flush=True)


def _loader(ds, order, workers, device):
    """Whole batches from `ds` in `order`, built in min(workers, CPUs) worker processes (0: here)."""
    from torch.utils.data import DataLoader
    workers = min(workers, _cpu_count(), len(order))
    # (each worker builds whole batches, 2 ahead: DataLoader's default prefetch; with batch 256 at 224²
    # that is 2 × 38 MB of shared memory per worker)
    # its own generator: DataLoader would otherwise draw its (here unused) worker seed from the global
    # RNG, which drives dropout, and a mid-epoch resume would then draw it once more than a whole run
    return DataLoader(ds, batch_size=None, sampler=order, num_workers=workers,
                      generator=torch.Generator().manual_seed(0),
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=False)


class _Batches(torch.utils.data.Dataset):
    """Batch b → (uint8 (B, S, S, 3), labels, flips, [(bad path, error, replacement path)])."""

    def __init__(self, folder, paths, labels, batches, size, *, train, base=0, flip=False):
        self.folder, self.paths, self.labels, self.batches = folder, paths, labels, batches
        self.size, self.train, self.base, self.flip = size, train, base, flip

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        idx = self.batches[b]
        s = self.size
        x = np.empty((len(idx), s, s, 3), dtype=np.uint8)
        y = np.empty(len(idx), dtype=np.int64)
        flips = np.zeros(len(idx), dtype=bool)
        bad = []
        for k, i in enumerate(idx):
            rng = random.Random(_sample_seed(self.base, int(i))) if self.train or self.flip else None
            for attempt in range(MAX_REPLACEMENTS):
                j = (int(i) + attempt) % len(self.paths)
                path = os.path.join(self.folder, self.paths[j].decode())
                try:
                    x[k] = load_train(path, s, rng) if self.train else load_val(path, s)
                    break
                except Exception as e:  # noqa: BLE001 (any decoder error: corrupt, truncated, not an image)
                    nxt = os.path.join(self.folder, self.paths[(j + 1) % len(self.paths)].decode())
                    bad.append((path, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", nxt))
                    if rng is not None:  # the replacement draws what the bad file would have drawn
                        rng = random.Random(_sample_seed(self.base, int(i)))
            else:
                raise DataError(f"imagenet: {MAX_REPLACEMENTS} unreadable images in a row from "
                                f"{os.path.join(self.folder, self.paths[int(i)].decode())}; is the data folder damaged?")
            y[k] = self.labels[j]
            flips[k] = self.flip and rng.random() < 0.5
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(flips), bad


def crop_params(height, width, rng, scale=SCALE, ratio=RATIO):
    """torchvision RandomResizedCrop.get_params with `rng` (random.Random) for its draws:
    (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the centre crop of the clamped ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _open(path):
    from PIL import Image
    return Image.open(path)


def _resize_box(im, box, size, full):
    """Resize the box (left, top, right, bottom, in `full`-size pixels) of `im` to size×size RGB,
    decoding a JPEG at the smallest DCT scale that keeps ≥ size pixels across the box."""
    from PIL import Image
    width, height = full
    bw, bh = box[2] - box[0], box[3] - box[1]
    if im.format == "JPEG" and min(bw, bh) >= 2 * size:
        im.draft("RGB", (math.ceil(width * size / bw), math.ceil(height * size / bh)))
    fx, fy = im.size[0] / width, im.size[1] / height
    if im.mode != "RGB":
        im = im.convert("RGB")
    out = im.resize((size, size), Image.BILINEAR, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
    return np.asarray(out)


def load_train(path, size, rng):
    """RandomResizedCrop(size) of the image at `path` (the draws from `rng`), uint8 (size, size, 3)."""
    with _open(path) as im:
        width, height = im.size
        top, left, h, w = crop_params(height, width, rng)
        return _resize_box(im, (left, top, left + w, top + h), size, (width, height))


def load_val(path, size):
    """Resize(round(size·256/224)) + CenterCrop(size) of the image at `path`, uint8 (size, size, 3)."""
    with _open(path) as im:
        width, height = im.size
        r = round(size * 256 / 224)
        short, long_ = (width, height) if width <= height else (height, width)  # torchvision Resize(r):
        new_long = int(r * long_ / short)  # shorter side r, longer int(r·long/short)
        nw, nh = (r, new_long) if width <= height else (new_long, r)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # CenterCrop's offsets
        fx, fy = nw / width, nh / height
        box = (left / fx, top / fy, (left + size) / fx, (top + size) / fy)
        return _resize_box(im, box, size, (width, height))
