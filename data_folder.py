"""Folder datasets (ImageNet's ImageFolder layout) streamed from image files, for `--dataset imagenet`.

Layout: DATA/train/<class>/<image> and DATA/val/<class>/<image>; the classes are the train folders
(sorted), so the class count follows the data (ImageNet 1000, Imagenette 10, TinyImageNet 200 ...).
Nothing is held in memory but the file names (one NumPy byte-string array).

Training batches (`FolderTrainLoader`, the interface of data_utils.TrainLoader: set_epoch, __len__,
__iter__ / iter_from yielding normalised device batches): DataLoader worker processes each build a whole
batch — decode, RandomResizedCrop, resize — and send it as uint8 (B, 3, H, W); the batch is pinned
(CUDA), copied with non_blocking, flipped and normalised on the device. Sample i of an epoch draws its
crop and flip from its own seed, a function of (seed, epoch, stream, shard, i) (data_utils._sample_seed),
so results do not depend on the worker count, and a mid-epoch resume starts at any batch without
decoding the ones before it.

RandomResizedCrop is torchvision's (scale (0.08, 1), ratio (3/4, 4/3), ten tries, then the centre crop of
the clamped ratio): the crop box (i, j, h, w) from the image size in the file header, the box cut out
and resized to S×S by torch's antialiased bilinear uint8 kernel — torchvision's resized_crop on PIL
images up to rounding (±1, rarely 2), about 3× faster than PIL's resize. JPEGs are decoded at full
size, as the official script's PIL loader does. With `reduced_decode` (a speed option, off by default)
a JPEG is decoded at reduced DCT size (PIL's `Image.draft`: 1/2, 1/4 or 1/8) when the box still has at
least S pixels a side there (box ≥ 2S: small S or large photos), i.e. the decode never goes below the
resolution the resize keeps; its pixels are not the official ones (libjpeg's DCT scaling, box edges on
the reduced grid: a few levels on average, up to ~100 at edges; README, "ImageNet"). Grayscale, CMYK
and palette images, and PNGs named .JPEG (all in ImageNet), are converted to RGB as torchvision's
ImageFolder loader does.

Validation (`FolderData.test_batches`): torchvision Resize(R) + CenterCrop(S), R = round(S·256/224),
from a full-size decode with the same kernel (torchvision's to ±1), streamed in batches, rank r of W
taking samples r, r+W, ...: every sample counted once.

An unreadable image (corrupt, truncated, not an image) is reported with its path on stderr. In
training it is replaced by the next readable sample in file order (same seed: deterministic) and the
epoch's metrics row counts the samples replaced (`bad_images`); in validation it is left out (the errors
are over the images read; a replacement would count another image twice) and counted
(`bad_test_images`). MAX_REPLACEMENTS (16) unreadable files in a row (training: the file and the 15
after it; validation: 16 of this rank's images in a row) stop the run with an error. The official
script (nblt/RWP train_rwp_imagenet.py) sets PIL's `ImageFile.LOAD_TRUNCATED_IMAGES`, so it trains on a
truncated JPEG with its missing part grey; here a truncated file is unreadable and replaced (a
process-wide PIL switch is not flipped behind the user's back).
"""
from __future__ import annotations

import hashlib
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
FATAL = "fatal"  # a bad-file record's third field that stops the run (its error field is the message)


def _list_split(root: str, split: str):
    """(class names, relative paths 'class/.../file' as bytes (os.fsencode), labels) of root/split,
    checked. The files of a class are found as torchvision's ImageFolder finds them (the class folder
    walked recursively, sorted, so TinyImageNet's train/<class>/images/ works), less hidden files and
    folders (macOS's ._name.JPEG, .ipynb_checkpoints)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"imagenet: no {split}/ folder in {root!r}; expected {root}/train/<class>/*.JPEG "
                        f"and {root}/val/<class>/*.JPEG (--data_dir)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"imagenet: {folder} has no class folders; expected {folder}/<class>/*.JPEG")
    paths, labels = [], []
    walked = {os.path.realpath(os.path.join(folder, name)) for name in classes}  # (see _walk_class)
    for label, name in enumerate(classes):
        found = [os.fsencode(os.path.join(dirpath[len(folder) + 1:], f))  # relative to split/; any characters
                 for dirpath, files in _walk_class(folder, name, walked)
                 for f in files if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
        if not found:
            raise DataError(f"imagenet: class folder {os.path.join(folder, name)} holds no image "
                            f"({', '.join(EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return classes, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)


def _walk_class(folder: str, name: str, walked: set):
    """(folder path, sorted file names) of folder/name and the folders below it, sorted, as
    torchvision's ImageFolder walks it (links to files and folders followed; hidden folders left out),
    except that a link is not followed into a folder listed already (`walked`: real paths, the class
    folders' from the start), into the split folder or a folder holding it, or into another class's
    folder: a loop (`loop -> ..`) would count images again, or under the wrong class. Each link not
    followed is named on stderr, in one line."""
    split, top = os.path.realpath(folder), os.path.realpath(os.path.join(folder, name))
    found = []
    for dirpath, dirs, files in os.walk(os.path.join(folder, name), followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith("."):
                continue
            if real in walked or split.startswith(real + os.sep) or real == split or (
                    real.startswith(split + os.sep) and not real.startswith(top + os.sep)):
                print(f"data: not following {os.path.join(dirpath, d)} -> {real}: a folder listed already, the split "
                      f"folder or another class's (a link loop?)", file=sys.stderr, flush=True)
                continue
            walked.add(real)
            keep.append(d)
        dirs[:] = keep
        found.append((dirpath, sorted(files)))
    return sorted(found)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def data_mismatch(was: dict, now: dict, parts=("classes", "val", "train")) -> list:
    """How the fingerprint `now` differs from `was` in `parts` (classes, train, val files): phrases."""
    found = []
    for part, count, names in (("classes", "classes", "class_names"), ("train", "train_files", "train_names"),
                               ("val", "val_files", "val_names")):
        if part in parts and was.get(count) != now[count]:
            found.append(f"{count.replace('_', ' ')} {was.get(count)} → {now[count]}")
        elif part in parts and was.get(names) != now[names]:
            found.append(f"{'class' if part == 'classes' else part} names differ")
    return found


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
        for name, split, asked, have in (("train_size", "train", train_size, len(train_paths)),
                                         ("test_size", "val", test_size, len(val_paths))):
            if asked > have:
                raise DataError(f"{name}: {asked} is more than the {have} images in {os.path.join(root, split)} (0 = all)")
        # what a run trains and is tested on (kept in its checkpoint and summary.json): the class names,
        # the train and val file names (relative, as listed: the same on any machine)
        self.fingerprint = {"classes": len(self.classes), "train_files": len(train_paths), "val_files": len(val_paths),
                            "class_names": _digest("\0".join(self.classes).encode()),
                            "train_names": _digest(train_paths.tobytes()), "val_names": _digest(val_paths.tobytes())}
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
        """Normalised validation batches of this rank's samples (shard, shard + num_shards, ...);
        unreadable images are left out and counted in self.bad_test_images (this rank, this pass)."""
        folder, paths, labels = self.val
        mine = np.arange(shard, len(paths), num_shards)
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        ds = _Batches(folder, paths, labels, batches, image_size, train=False, replace=False)
        self.bad_test_images, run = 0, 0
        for b, (x, y, _flip, bad) in enumerate(_loader(ds, range(len(batches)), workers, device)):
            _report(bad)
            self.bad_test_images += len(bad)
            run = _bad_run(run, bad, len(batches[b]))
            if len(y):
                yield augment.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


class FolderTrainLoader:
    """One epoch of augmented training batches from a folder dataset (data_utils.TrainLoader's
    interface and sharding: permutation from (seed, epoch, stream), rank shard::num_shards of it;
    the last partial batch is kept unless it would hold a single sample)."""

    def __init__(self, data: FolderData, batch_size, image_size, augment, *, device, seed=0, stream=0,
                 shard=0, num_shards=1, workers=0, random_crop=True, flip=True, reduced_decode=False):
        self.folder, self.paths, self.labels = data.train
        self.batch_size, self.image_size, self.augment = batch_size, image_size, augment
        self.device = torch.device(device)
        self.seed, self.stream, self.shard, self.num_shards = seed, stream, shard, num_shards
        self.workers, self.random_crop, self.flip = workers, random_crop, flip
        self.reduced_decode = reduced_decode
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
                      replace=True, base=base, flip=self.flip, reduced=self.reduced_decode)
        for x, y, flip, bad in _loader(ds, range(start, self.num_batches), self.workers, self.device):
            _report(bad)
            self.bad_images += len({k for k, *_ in bad})  # samples replaced (a walk may pass several files)
            x = x.to(self.device, non_blocking=True)
            if self.flip:
                flip = flip.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(3), x)
            yield self.augment.normalize(x), y.to(self.device, non_blocking=True)


def _report(bad):
    """Print the unreadable files of a batch; a FATAL record raises DataError (here, in the main
    process: raised in a DataLoader worker it would arrive wrapped in the worker's traceback)."""
    said = set()
    for _k, path, error, other in bad:
        if other == FATAL:
            raise DataError(error)
        if path not in said:  # (once a batch: the replacement walks of neighbours pass the same files)
            said.add(path)
            print(f"data: unreadable image {path} ({error}); " + (f"replaced by {other}" if other else "left out"),
                  file=sys.stderr, flush=True)


def _bad_run(run, bad, n):
    """The run of unreadable samples at the end of a validation batch of n samples (`bad`: its
    records, positions ascending), continuing the `run` the batch before ended with; DataError when a
    run reaches MAX_REPLACEMENTS."""
    last = -1
    for p, path, _error, _other in bad:
        run = run + 1 if p == last + 1 else 1
        last = p
        if run >= MAX_REPLACEMENTS:
            raise DataError(f"imagenet: {MAX_REPLACEMENTS} unreadable validation images in a row, the last "
                            f"{path}; is the data folder damaged?")
    return run if last == n - 1 else 0


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
    """Batch b → (uint8 (B, 3, S, S), labels, flips, [(position in the batch, bad path, error,
    replacement path or None or FATAL)]). `train`: RandomResizedCrop (else the validation transform).
    `replace` (training): an unreadable file is replaced by the next readable one in file order, the
    same draws; MAX_REPLACEMENTS failures for one sample make a FATAL record. Otherwise (validation)
    it is left out (B is then smaller). `reduced`: training crops from a reduced-DCT decode (load_train)."""

    def __init__(self, folder, paths, labels, batches, size, *, train, replace, base=0, flip=False, reduced=False):
        self.folder, self.paths, self.labels, self.batches = folder, paths, labels, batches
        self.size, self.train, self.replace, self.base, self.flip = size, train, replace, base, flip
        self.reduced = reduced

    def __len__(self):
        return len(self.batches)

    def _path(self, j):
        return os.path.join(self.folder, os.fsdecode(self.paths[j % len(self.paths)]))

    def __getitem__(self, b):
        idx = self.batches[b]
        s = self.size
        x = np.empty((len(idx), 3, s, s), dtype=np.uint8)
        y = np.empty(len(idx), dtype=np.int64)
        flips = np.zeros(len(idx), dtype=bool)
        keep = np.ones(len(idx), dtype=bool)
        bad = []
        for k, i in enumerate(idx):
            seeded = self.train or self.flip
            rng = random.Random(_sample_seed(self.base, int(i))) if seeded else None
            for attempt in range(MAX_REPLACEMENTS if self.replace else 1):
                j = (int(i) + attempt) % len(self.paths)
                try:
                    x[k] = (load_train(self._path(j), s, rng, reduced=self.reduced) if self.train
                            else load_val(self._path(j), s))
                    break
                except Exception as e:  # noqa: BLE001 (any decoder error: corrupt, truncated, not an image)
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    bad.append((k, self._path(j), error, self._path(j + 1) if self.replace else None))
                    if seeded:  # the replacement draws what the bad file would have drawn
                        rng = random.Random(_sample_seed(self.base, int(i)))
            else:  # every attempt failed
                keep[k] = False
                if self.replace:  # MAX_REPLACEMENTS in a row: the run stops (raised in the main process, by _report)
                    bad.append((k, self._path(int(i)), f"imagenet: {MAX_REPLACEMENTS} unreadable images in a "
                                f"row from {self._path(int(i))}; is the data folder damaged?", FATAL))
                    keep[k:] = False
                    break
                continue
            y[k] = self.labels[j]
            flips[k] = self.flip and rng.random() < 0.5
        if not keep.all():
            x, y, flips = x[keep], y[keep], flips[keep]
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


def _pixels(im, want=None, *, writable=False):
    """The image's pixels as an RGB uint8 array (H', W', 3), and the decode's scale H'/H = W'/W: a
    JPEG is decoded at the smallest DCT size (PIL's `Image.draft`: 1/2, 1/4 or 1/8) that keeps at
    least `want` = (w, h) pixels across the full image; anything else, or with `want` None, at full
    size. Grayscale, CMYK and palette images become RGB as in torchvision's loader (PIL
    convert("RGB"))."""
    width, height = im.size
    scale = 1.0
    if want is not None and im.format == "JPEG" and 2 * want[0] <= width and 2 * want[1] <= height:
        drafted = im.draft("RGB", want)
        if drafted is not None:  # (0, 0, width / s, height / s): libjpeg's 1/s DCT scaling, exactly
            scale = drafted[1][2] / width
    if im.mode != "RGB":
        im = im.convert("RGB")
    a = np.array(im) if writable else np.asarray(im)
    return a, scale


def _resize(a, h, w):
    """uint8 (H, W, 3) → (3, h, w): torch's antialiased bilinear resize, which equals PIL's BILINEAR
    resize (torchvision's on PIL images) up to rounding (±1, rarely 2), on torch's uint8 channels-last kernel
    (its output is contiguous (3, h, w): the batch's layout, copied into it without a transpose)."""
    if (a.shape[0], a.shape[1]) == (h, w):
        return a.transpose(2, 0, 1)
    x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) in channels-last memory
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].numpy()


def load_train(path, size, rng, *, reduced=False):
    """RandomResizedCrop(size) of the image at `path` (the draws from `rng`), uint8 (3, size, size):
    the image decoded at full size (as torchvision), the crop box cut out, then resized, as
    torchvision's resized_crop does (the box's edge pixels see nothing outside it). With `reduced`,
    when a reduced DCT size (1/s) still has ≥ size pixels across the box, the box is cut from that
    decode, its edges at the nearest pixel of the 1/s grid (faster; an approximation of the official
    pixels)."""
    with _open(path) as im:
        width, height = im.size
        top, left, h, w = crop_params(height, width, rng)
        want = (math.ceil(width * size / w), math.ceil(height * size / h)) if reduced else None
        a, f = _pixels(im, want)
        if f != 1.0:
            top, left, bottom, right = round(top * f), round(left * f), round((top + h) * f), round((left + w) * f)
            top, left, h, w = top, left, bottom - top, right - left
        crop = a[top:top + h, left:left + w].copy()  # dense (the resize kernel's fast path), writable
        return _resize(crop, size, size)


def load_val(path, size):
    """Resize(round(size·256/224)) + CenterCrop(size) of the image at `path`, uint8 (3, size, size),
    as torchvision does them: decoded at full size (the test errors stay comparable with the official
    evaluation's), the whole image resized (shorter side r, longer int(r·long/short)), then the centre
    cut out."""
    with _open(path) as im:
        width, height = im.size
        r = round(size * 256 / 224)
        short, long_ = (width, height) if width <= height else (height, width)  # torchvision Resize(r):
        new_long = int(r * long_ / short)  # shorter side r, longer int(r·long/short)
        nw, nh = (r, new_long) if width <= height else (new_long, r)
        a, _ = _pixels(im, writable=True)
        out = _resize(a, nh, nw)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # CenterCrop's offsets
        return out[:, top:top + size, left:left + size]
