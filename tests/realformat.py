"""Small CIFAR-10/100 and SVHN in their published on-disk formats (python pickles; MATLAB v5 .mat
files written with scipy.io), and the md5 lists torchvision checks pointed at these files."""
import hashlib
import os
import pickle

import numpy as np
import torch


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_cifar(root, hundred, n_per_file=20, seed=0):
    """Small CIFAR-10/100 in the real python-pickle layout; returns (folder, files, meta name,
    {split: (images NCHW, labels)})."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"  # py2 str keys load as str
    written = {"train": [], "test": []}
    for name in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100 if hundred else 10, n_per_file).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, key: labels, "filenames": ["x"] * n_per_file}, f, protocol=2)
        written["test" if "test" in name else "train"].append((data, labels))
    meta = "meta" if hundred else "batches.meta"
    names = {"fine_label_names": ["c%d" % i for i in range(100)]} if hundred else \
        {"label_names": ["c%d" % i for i in range(10)]}
    with open(os.path.join(folder, meta), "wb") as f:
        pickle.dump(names, f, protocol=2)
    out = {}
    for split, parts in written.items():
        x = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
        out[split] = (torch.from_numpy(x), torch.tensor(sum((lab for _, lab in parts), [])))
    return folder, files, meta, out


def trust_cifar(monkeypatch, hundred, folder, files, meta):
    """torchvision checks each file's md5 against the official archive's: point it at ours, on purpose."""
    from torchvision import datasets
    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    sums = {name: md5(os.path.join(folder, name)) for name in files + [meta]}
    monkeypatch.setattr(cls, "train_list", [[n, sums[n]] for n in files if "test" not in n])
    monkeypatch.setattr(cls, "test_list", [[n, sums[n]] for n in files if "test" in n])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums[meta]})


def write_svhn(root, monkeypatch, sizes=(("train", 7), ("test", 5)), seed=0):
    """SVHN's .mat files as published (X is H×W×C×N uint8, y holds 1..10 with 10 for the digit 0),
    torchvision's md5 check pointed at them; returns {split: (images NCHW, labels 0..9)}."""
    from scipy.io import savemat
    from torchvision import datasets
    rng = np.random.default_rng(seed)
    expected, split_list = {}, {}
    for split, n in sizes:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        name = os.path.join(root, f"{split}_32x32.mat")
        savemat(name, {"X": x, "y": y})
        split_list[split] = ["unused-url", os.path.basename(name), md5(name)]
        expected[split] = (torch.from_numpy(x.transpose(3, 2, 0, 1).copy()),
                           torch.from_numpy(np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64)))
    monkeypatch.setattr(datasets.SVHN, "split_list", split_list)
    return expected
