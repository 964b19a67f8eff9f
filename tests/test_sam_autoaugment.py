"""sam_autoaugment.py: the SAM code's AutoAugment (google-research/sam at dae9904, autoaugment/), each
operation checked against a NumPy transcription of its TF definition on a few images."""
import hashlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import data_utils
import sam_autoaugment as saa
from runner.config import UsageError, parse_config


def images():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
    low = torch.randint(60, 120, (3, 32, 32), generator=g, dtype=torch.uint8)  # low contrast
    ramp = (torch.arange(32 * 32).view(32, 32) % 251).to(torch.uint8).expand(3, 32, 32).clone()
    return [noise, low, ramp]


def np_blend(a, b, f):
    a, b = a.astype(np.float32), b.astype(np.float32)
    if f == 0:
        return a.astype(np.uint8)
    if f == 1:
        return b.astype(np.uint8)
    t = a + np.float32(f) * (b - a)
    if not 0 < f < 1:
        t = np.clip(t, 0, 255)
    return t.astype(np.uint8)


def np_gray(x):
    f = x.astype(np.float32) * np.float32(1 / 255)
    g = f[0] * np.float32(0.2989) + f[1] * np.float32(0.5870) + f[2] * np.float32(0.1140)
    return (g * np.float32(255.5)).astype(np.uint8)


def test_policies_are_the_sam_codes():
    """95 CIFAR and 25 SVHN sub-policies, equal to policies.py's lists (compared element by element
    with the fetched file on 2026-12-01; pinned here by a digest)."""
    cifar, svhn = saa.POLICIES["cifar"], saa.POLICIES["svhn"]
    assert len(cifar) == 95 and len(svhn) == 25
    assert cifar[0] == [("Invert", 0.1, 7), ("Contrast", 0.2, 6)]
    assert cifar[-1] == [("Equalize", 0.6, 9), ("Equalize", 0.4, 4)]
    assert svhn[0] == [("ShearX", 0.9, 4), ("Invert", 0.2, 3)] and svhn[-1] == [("ShearX", 0.7, 2), ("Invert", 0.1, 5)]
    assert sum(op == "Cutout" for sub in cifar for op, _, _ in sub) == 3
    digest = hashlib.sha256(repr((cifar, svhn)).encode()).hexdigest()[:16]
    assert digest == DIGEST


DIGEST = "e74ec1903d602e31"  # of the lists as checked equal to policies.py at dae9904 (2026-12-01)


@pytest.mark.parametrize("f", [0.0, 0.1, 0.55, 1.0, 1.9])
def test_colour_ops_follow_blend(f):
    for x in images():
        n = x.numpy()
        assert np.array_equal(saa.blend(torch.zeros_like(x), x, f).numpy(), np_blend(np.zeros_like(n), n, f))
        assert np.array_equal(saa.color(x, f).numpy(), np_blend(np.broadcast_to(np_gray(n), n.shape), n, f))
        assert np.array_equal(saa.brightness(x, f).numpy(), np_blend(np.zeros_like(n), n, f))  # torchvision's
        assert np.array_equal(saa.contrast(x, f).numpy(), np_blend(np.full_like(n, 4), n, f))  # (sic) 1024/256


def test_contrast_is_not_torchvisions():
    x = images()[1]
    assert not torch.equal(saa.contrast(x, 0.5), TF.adjust_contrast(x, 0.5))


@pytest.mark.parametrize("f", [0.1, 1.9])
def test_sharpness(f):
    for x in images():
        n = x.numpy().astype(np.float32)
        k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13)
        s = n.copy()
        for i in range(1, 31):
            for j in range(1, 31):
                s[:, i, j] = np.clip((n[:, i - 1:i + 2, j - 1:j + 2] * k).sum((1, 2)), 0, 255).astype(np.uint8)
        got = saa.sharpness(x, f).numpy().astype(int)
        want = np_blend(s.astype(np.uint8), x.numpy(), f).astype(int)
        # equal up to the float summation order of the 3×3 sum (±1 where a sum is an exact integer)
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.05


def test_autocontrast_equalize_invert_posterize_solarize():
    for x in images():
        n = x.numpy()
        want = []
        for ch in n:
            lo, hi = np.float32(ch.min()), np.float32(ch.max())
            if hi > lo:
                s = np.float32(255.0) / (hi - lo)
                want.append(np.clip(ch.astype(np.float32) * s + (-lo * s), 0, 255).astype(np.uint8))
            else:
                want.append(ch)
        assert np.array_equal(saa.autocontrast(x).numpy(), np.stack(want))
        eq = []
        for ch in n:  # the TF code's equalize (PIL's rule)
            hist = np.bincount(ch.ravel(), minlength=256)
            nz = hist[hist != 0]
            step = (nz.sum() - nz[-1]) // 255
            if step == 0:
                eq.append(ch)
                continue
            lut = np.clip(np.concatenate([[0], ((np.cumsum(hist) + step // 2) // step)[:-1]]), 0, 255)
            eq.append(lut[ch].astype(np.uint8))
        assert np.array_equal(saa.apply_op(x, "Equalize", 5).numpy(), np.stack(eq))
        assert np.array_equal(saa.apply_op(x, "Invert", 5).numpy(), 255 - n)
        assert np.array_equal(saa.apply_op(x, "Posterize", 7).numpy(), (n >> 6) << 6)  # ⌊4·0.7⌋ = 2 bits
        t = int(0.5 * 256)
        assert np.array_equal(saa.apply_op(x, "Solarize", 5).numpy(), np.where(n < t, n, 255 - n))
        assert torch.equal(saa.solarize(x, 256), x)


def np_project(n, t):
    c, h, w = n.shape
    t = np.asarray(t, np.float32)
    out = np.full_like(n, 128)
    for y in range(h):
        for x in range(w):
            k = t[6] * np.float32(x) + t[7] * np.float32(y) + np.float32(1)
            sx = (t[0] * np.float32(x) + t[1] * np.float32(y) + t[2]) / k
            sy = (t[3] * np.float32(x) + t[4] * np.float32(y) + t[5]) / k
            sx, sy = int(np.sign(sx) * np.floor(abs(sx) + 0.5)), int(np.sign(sy) * np.floor(abs(sy) + 0.5))
            if 0 <= sx < w and 0 <= sy < h:
                out[:, y, x] = n[:, sy, sx]
    return out


def test_geometric_ops():
    x = images()[0]
    n = x.numpy()
    for level in (3, 8):
        for sign in (1, -1):
            s = sign * level / 10 * 0.3
            assert np.array_equal(saa.project(x, [1, s, 0, 0, 1, 0, 0, 0]).numpy(), np_project(n, [1, s, 0, 0, 1, 0, 0, 0]))
            assert np.array_equal(saa.project(x, [1, 0, 0, s, 1, 0, 0, 0]).numpy(), np_project(n, [1, 0, 0, s, 1, 0, 0, 0]))
    # TranslateX by d: output (x, y) ← input (x + d, y); level 1 = 25 px, level ≥ 2 leaves nothing
    moved = saa.project(x, [1, 0, 25, 0, 1, 0, 0, 0])
    assert torch.equal(moved[:, :, :7], x[:, :, 25:]) and (moved[:, :, 7:] == 128).all()
    for seed in range(4):
        torch.manual_seed(seed)
        assert (saa.apply_op(x, "TranslateY", 2) == 128).all()
    # Rotate: 90° is numpy's rot90 (tfa's transform: counter-clockwise as displayed)
    assert torch.equal(saa.rotate(x, 90.0), torch.from_numpy(np.rot90(n, 1, axes=(1, 2)).copy()))
    r = saa.rotate(x, 21.0)
    assert (r.numpy() != 128).mean() > 0.7 and (r.numpy() == 128).any()


def test_cutout_op_is_a_grey_square_around_a_uniform_centre():
    x = images()[0]
    for pad in (4, 30):
        torch.manual_seed(pad)
        got = saa.apply_op(x, "Cutout", pad // 10 if pad >= 10 else 0) if pad >= 10 else saa.cutout(x, pad)
        torch.manual_seed(pad)
        cy, cx = int(torch.randint(0, 32, ())), int(torch.randint(0, 32, ()))
        p = 30 if pad >= 10 else pad
        want = x.clone()
        want[:, max(0, cy - p):min(32, cy + p), max(0, cx - p):min(32, cx + p)] = 128
        assert torch.equal(got, want)


def test_policy_draws_are_seeded_and_change_images():
    aa = data_utils.autoaugment_policy("cifar10", 128, 3, "sam")
    x = images()[0]
    torch.manual_seed(5)
    a = [aa(x) for _ in range(20)]
    torch.manual_seed(5)
    b = [aa(x) for _ in range(20)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert sum(not torch.equal(p, x) for p in a) >= 10
    assert data_utils.autoaugment_policy("svhn", 128, 3, "sam").policy is saa.POLICIES["svhn"]


def test_trainloader_with_the_sam_policy():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8)
    aug = data_utils.Augment((0.5,) * 3, (0.25,) * 3, crop=True, flip=True, pad_mode="reflect")
    policy = data_utils.autoaugment_policy("cifar10", 128, 3, "sam")
    loader = data_utils.TrainLoader(x, y, 4, aug, device="cpu", autoaugment=policy, policy_first=True)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 2


def test_config_field():
    cfg, _ = parse_config(["--autoaugment", "--autoaugment_policy", "sam"])
    assert cfg.autoaugment_policy == "sam"
    assert parse_config([])[0].autoaugment_policy == "torchvision"  # today's policy stays the default
    with pytest.raises(UsageError, match="RGB"):
        parse_config(["--dataset", "fashionmnist", "--autoaugment", "--autoaugment_policy", "sam"])
