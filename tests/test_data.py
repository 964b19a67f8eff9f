"""Data: real on-disk formats (CIFAR pickles and SVHN .mat files written by tests/realformat.py,
real Fashion-MNIST idx files), the device loader's shuffling/sharding, and the augmentation properties."""
import gzip
import os

import numpy as np
import pytest
import torch

import data_utils
from conftest import FASHION_DIR
from realformat import trust_cifar, write_cifar, write_svhn
from data_utils import Augment, DataError, TrainLoader, load_dataset


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_real_format_through_torchvision(tmp_path, monkeypatch, hundred):
    folder, files, meta, expected = write_cifar(str(tmp_path), hundred)
    trust_cifar(monkeypatch, hundred, folder, files, meta)
    name = "cifar100" if hundred else "cifar10"
    for train, split in ((True, "train"), (False, "test")):
        x, y = load_dataset(name, str(tmp_path), train)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])
    x, _ = load_dataset(name, str(tmp_path), True, size=7)
    assert len(x) == 7


def test_svhn_real_format_through_torchvision(tmp_path, monkeypatch):
    """SVHN's .mat files (MATLAB v5, as published: X is H×W×C×N uint8, y holds 1..10 with 10 for
    the digit 0), read by torchvision with scipy.io, whose md5 check is pointed at our files."""
    expected = write_svhn(str(tmp_path), monkeypatch)
    for train, split in ((True, "train"), (False, "test")):
        x, y = load_dataset("svhn", str(tmp_path), train)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])


def test_missing_data_says_how_to_get_it(tmp_path):
    for name in ("cifar10", "cifar100", "svhn"):
        with pytest.raises(DataError, match="--download.*put"):
            load_dataset(name, str(tmp_path / "nowhere"), True)
        with pytest.raises(DataError, match="--download"):
            load_dataset(name, str(tmp_path), True)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_flat_idx_folder(tmp_path):
    rng = np.random.default_rng(1)
    imgs, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    x, y = load_dataset("fashionmnist", str(tmp_path), True)
    assert x.shape == (5, 1, 28, 28) and torch.equal(x[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert torch.equal(y, torch.from_numpy(labels))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_idx(bad / "train-images-idx3-ubyte.gz", imgs)
    with gzip.open(bad / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([9], dtype=">u4").tobytes() + b"\x01")  # truncated
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashionmnist", str(bad), True)


def test_corrupt_or_truncated_gz_is_a_data_error(tmp_path):
    """A damaged .gz names the file and the damage (gzip/zlib/EOF errors were tracebacks)."""
    imgs = np.random.default_rng(2).integers(0, 256, (50, 28, 28))  # incompressible: stored blocks
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(50))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, imgs)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for data, match in ((b"garbage\n", "corrupt.*Not a gzipped file"),  # not gzip at all
                        (good[:len(good) // 2], "truncated"),               # cut short
                        (bytes(flipped), "corrupt")):                       # damaged inside (CRC)
        path.write_bytes(data)
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is " + match):
            load_dataset("fashionmnist", str(tmp_path), True)


def _no_network(monkeypatch):
    """Every URL torchvision opens fails as on a machine without network access."""
    import urllib.error
    import urllib.request

    def urlopen(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("name,where", [("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat"),
                                        ("fashionmnist", "idx files")])
def test_failed_download_says_why_and_where_to_put_the_files(tmp_path, monkeypatch, capsys, name, where):
    import main
    _no_network(monkeypatch)
    monkeypatch.setattr(data_utils, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))
    with pytest.raises(DataError, match=f"{name}: download failed \\(.*Temporary failure in name "
                                        f"resolution.*\\); put .*{where}.* by hand"):
        load_dataset(name, str(tmp_path / "data" / "sub"), True, download=True)
    assert not (tmp_path / "data").exists()  # the failed attempt removed the folders it created
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("kept")
    with pytest.raises(DataError):
        load_dataset(name, str(tmp_path / "data"), True, download=True)
    assert os.listdir(tmp_path / "data") == ["mine.txt"]  # what was there before stays
    if name == "cifar10":  # the command line: one line, exit 2
        assert main.main(["--dataset", name, "--data_dir", str(tmp_path / "data"), "--download",
                          "--model", "wrn10_1", "--out_dir", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("main.py: error: cifar10: download failed") and err.count("\n") == 1


def test_download_failing_its_integrity_check_is_a_data_error(tmp_path, monkeypatch):
    import io
    import urllib.request

    class Response(io.BytesIO):  # a server that answers with the wrong bytes
        url, length = None, 7

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(b"garbage"))
    with pytest.raises(DataError, match="cifar10: download failed \\(File not found or corrupted.\\)"):
        load_dataset("cifar10", str(tmp_path), True, download=True)


def test_real_fashion_mnist_files():
    if not os.path.isdir(FASHION_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the Debian package dataset-fashion-mnist ({FASHION_DIR})")
        pytest.skip("dataset-fashion-mnist not installed")
    x, y = load_dataset("fashionmnist", FASHION_DIR, True)
    xt, yt = load_dataset("fashionmnist", FASHION_DIR, False)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert y[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels of the training set
    # the pixel mean of Fashion-MNIST is 0.286
    assert abs(x.float().mean().item() / 255 - 0.2860) < 1e-3


def _loader(n=103, batch=10, **kw):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    aug = Augment((0.0,), (1 / 255,))  # normalisation is the identity in pixel units
    return TrainLoader(x, torch.arange(n), batch, aug, device="cpu", **kw)


def test_loader_epoch_is_a_seeded_permutation():
    a, b = _loader(seed=3), _loader(seed=3)
    ys = [y for _, y in a]
    assert len(ys) == len(a) == 11 and len(ys[-1]) == 3
    assert sorted(torch.cat(ys).tolist()) == list(range(103))
    assert all(torch.equal(u, v) for u, v in zip(ys, [y for _, y in b]))  # same seed → same batches
    for x, y in a:  # images travel with their labels
        assert torch.equal(x[:, 0, 0, 0], y.float())
    a.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat(ys))  # new epoch → new order
    other = torch.cat([y for _, y in _loader(seed=4)])
    assert not torch.equal(other, torch.cat(ys))


def test_shuffle_seeds_are_pinned():
    """The seeds behind every shuffle and augmentation, pinned: a run's batches must not change
    with the numpy version (numpy 1.x refused the uint64 shift this once did) or a refactor."""
    assert data_utils.mix_seed(0, 0, 0) == 7896617691693857887
    assert data_utils.mix_seed(1, 2, 3, 4, 1) == 6075934308843828514
    assert all(0 <= data_utils.mix_seed(s, e) < 2 ** 63 for s in range(3) for e in range(3))


def test_loader_shards_and_streams():
    shards = [torch.cat([y for _, y in _loader(n=100, shard=s, num_shards=2)]) for s in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    s0, s1 = (torch.cat([y for _, y in _loader(stream=k)]) for k in (0, 1))
    assert sorted(s1.tolist()) == list(range(103)) and not torch.equal(s0, s1)
    assert len(_loader(n=21, batch=10)) == 2  # a last batch of one sample is dropped


def _images(b=64, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


def test_crop_is_a_window_of_the_padded_image():
    x = _images()
    for mode in ("constant", "reflect"):
        aug = Augment(**IDENTITY, crop=True, padding=4, pad_mode=mode, fill=128)
        out = aug(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape
        padded = torch.nn.functional.pad(x.float(), (4,) * 4, mode=mode, **({"value": 128.0} if mode == "constant" else {}))
        shifts = set()
        for i in range(len(x)):
            hits = [(dy, dx) for dy in range(9) for dx in range(9)
                    if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
            assert hits, "crop output is not a window of the padded image"
            shifts.add(hits[0])
        assert len(shifts) > 20  # offsets vary across the batch


def test_flip_is_a_flip_half_the_time():
    x = _images(b=400)
    out = Augment(**IDENTITY, flip=True)(x, torch.Generator().manual_seed(0))
    same = [torch.equal(o, i.float()) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.float().flip(2)) for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 150 < sum(flipped) < 250


@pytest.mark.parametrize("style", ["amp", "rwp"])
def test_cutout_zeroes_one_clipped_square(style):
    x = torch.full((500, 3, 32, 32), 200, dtype=torch.uint8)
    mean = (100 / 255,) * 3
    aug = Augment(mean, (1 / 255,) * 3, cutout_size=16, cutout_style=style)
    out = aug(x, torch.Generator().manual_seed(0))
    # amp: holes are black before normalising (→ -100); rwp: zero after normalising (= the mean)
    hole_value = -100.0 if style == "amp" else 0.0
    assert set(out.unique().tolist()) <= {hole_value, 100.0}
    hole = out[:, 0] == hole_value
    assert torch.equal(hole, (out == hole_value).all(1))  # same hole in every channel
    full = 0
    for m in hole:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert m[r0:r1, c0:c1].all() and m.sum() == (r1 - r0) * (c1 - c0)  # one rectangle
        assert r1 - r0 <= 16 and c1 - c0 <= 16
        # a side shorter than 16 only where the box touches the border
        assert (r1 - r0 == 16) or r0 == 0 or r1 == 32
        full += int(m.sum() == 256)
    assert full > 100  # most holes lie fully inside


def test_cutout_probability():
    x = torch.full((1000, 1, 28, 28), 200, dtype=torch.uint8)
    aug = Augment((0.0,), (1 / 255,), cutout_size=8, cutout_prob=0.5, cutout_style="rwp")
    holes = (aug(x, torch.Generator().manual_seed(0)) == 0).flatten(1).any(1).float().mean().item()
    assert 0.45 < holes < 0.55


def _reference_augment(aug, x, g):
    """Plain per-image loop: the same random draws in the same order, applied by slicing."""
    b, c, h, w = x.shape
    p = aug.padding
    pad = dict(mode="reflect") if aug.pad_mode == "reflect" else dict(value=float(aug.fill))
    dy = torch.randint(0, 2 * p + 1, (b, 1), generator=g) if aug.crop else torch.full((b, 1), p)
    dx = torch.randint(0, 2 * p + 1, (b, 1), generator=g) if aug.crop else torch.full((b, 1), p)
    flip = torch.rand(b, 1, 1, 1, generator=g) < 0.5 if aug.flip else torch.zeros(b, 1, 1, 1, dtype=torch.bool)
    out = []
    for k in range(b):
        img = torch.nn.functional.pad(x[k:k + 1].float(), (p,) * 4, **pad)[0]
        img = img[:, dy[k]:dy[k] + h, dx[k]:dx[k] + w]
        out.append(img.flip(2) if flip[k] else img)
    out = torch.stack(out)

    def cutout(out):
        half = aug.cutout_size // 2
        side = 2 * half if aug.cutout_style == "amp" else aug.cutout_size
        y0 = torch.randint(-half, h - half, (b, 1, 1, 1), generator=g)
        x0 = torch.randint(-half, w - half, (b, 1, 1, 1), generator=g)
        keep = torch.rand(b, 1, 1, 1, generator=g) < aug.cutout_prob if aug.cutout_prob < 1 else [True] * b
        for k in range(b):
            if keep[k]:
                y, xx = int(y0[k]), int(x0[k])
                out[k, :, max(y, 0):max(y + side, 0), max(xx, 0):max(xx + side, 0)] = 0
        return out

    if aug.cutout_size and aug.cutout_style == "amp":
        out = cutout(out)
    out = aug.normalize(out)
    if aug.cutout_size and aug.cutout_style == "rwp":
        out = cutout(out)
    return out


@pytest.mark.parametrize("crop,mode,flip,cutout,style,prob", [
    (True, "constant", True, 16, "amp", 1.0),    # AMP's CIFAR recipe
    (True, "constant", True, 16, "rwp", 0.5),
    (True, "reflect", True, 0, "amp", 1.0),      # SAM's CIFAR recipe
    (True, "reflect", False, 8, "rwp", 1.0),
    (False, "constant", True, 8, "amp", 0.5),
    (True, "constant", False, 0, "amp", 1.0),
])
def test_augment_equals_a_plain_per_image_loop(crop, mode, flip, cutout, style, prob):
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    aug = Augment(mean, std, crop=crop, padding=4, pad_mode=mode, fill=128, flip=flip,
                  cutout_size=cutout, cutout_prob=prob, cutout_style=style)
    x = _images(b=50, seed=3)
    fast = aug(x, torch.Generator().manual_seed(5))
    ref = _reference_augment(aug, x, torch.Generator().manual_seed(5))
    assert torch.equal(fast, ref)


def test_normalisation_uses_the_statistics():
    x = _images(b=4)
    info = data_utils.DATASETS["cifar10"]
    out = Augment(info.mean, info.std).normalize(x)
    expected = (x.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_autoaugment_path_is_seeded_and_finishes_on_device():
    x = _images(b=40)
    aug = Augment(**IDENTITY, crop=True, padding=4, fill=128, flip=True, cutout_size=8)
    policy = data_utils.autoaugment_policy("cifar10", 128, 3)
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        loader = TrainLoader(x, torch.arange(40), 16, aug, device="cpu", seed=1, autoaugment=policy, workers=0)
        batches.append([(bx, by) for bx, by in loader])
    assert [len(b) for b, _ in batches[0]] == [16, 16, 8]
    for (a, ya), (b, yb) in zip(*batches):
        assert torch.equal(a, b) and torch.equal(ya, yb) and a.dtype == torch.float32



def _autoaugment_epoch(x, workers, epoch=0):
    """One epoch's batches with crop, flip and AutoAugment (all per sample on the CPU), batch 8."""
    aug = Augment(**IDENTITY, crop=True, padding=4, fill=128, flip=True)
    policy = data_utils.autoaugment_policy("cifar10", 128, 3)
    loader = TrainLoader(x, torch.arange(len(x)), 8, aug, device="cpu", seed=1, autoaugment=policy,
                         workers=workers)
    loader.set_epoch(epoch)
    return [(bx, by) for bx, by in loader]


def test_autoaugment_depends_on_neither_workers_nor_global_rng():
    """A sample's augmentation is a function of (seed, epoch, stream, sample): the same batches
    with 0 workers (main process) as with 2, whatever the global RNG holds; the main process's
    global RNG is left as it was (it drives dropout; a mid-epoch resume restores it)."""
    x = _images(b=40)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    serial = _autoaugment_epoch(x, workers=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(6)
    parallel = _autoaugment_epoch(x, workers=2)
    assert len(serial) == len(parallel) == 5
    for (a, ya), (b, yb) in zip(serial, parallel):
        assert torch.equal(ya, yb) and torch.equal(a, b)
    # one image 40 times: a draw of its own for every sample, new ones every epoch
    one = x[:1].expand(40, 3, 32, 32).contiguous()
    outs = [{tuple(o.flatten().tolist()) for b, _ in _autoaugment_epoch(one, 0, epoch) for o in b}
            for epoch in (0, 1)]
    assert len(outs[0]) > 30 and len(outs[0] & outs[1]) < 10


@pytest.mark.parametrize("first", [False, True])
def test_autoaugment_order(first):
    """AMP's code: crop, flip, then the policy; SAM's (policy_first): the policy, then flip and crop.
    A recording policy sees the stored images themselves only in SAM's order."""
    x = _images(b=16)
    seen = []

    def policy(img):
        seen.append(img.clone())
        return img
    aug = Augment(**IDENTITY, crop=True, padding=4, fill=128, flip=True)
    loader = TrainLoader(x, torch.arange(16), 8, aug, device="cpu", seed=1, autoaugment=policy,
                         policy_first=first, workers=0)
    for _ in loader:
        pass
    originals = sum(any(torch.equal(s, img) for img in x) for s in seen)
    assert len(seen) == 16 and (originals == 16 if first else originals < 8)


def test_autoaugment_workers_are_capped_at_the_cpus_silently(monkeypatch):
    """--workers 4 on a 2-core machine made DataLoader warn; the loader now starts at most one
    worker per CPU this process may run on (the count does not change results)."""
    import warnings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one CPU
    x = _images(b=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped = _autoaugment_epoch(x, workers=4)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(capped, _autoaugment_epoch(x, workers=0)))
