"""`bench.py imagenet_pipeline`: decoded + augmented images/s per CPU core of the ImageNet file
pipeline (data_folder.py) against the official one (torchvision ImageFolder + PIL transforms)."""
from __future__ import annotations

import datetime
import os
import time

from runner.bench_step import device_name
from runner.config import Parser, UsageError
from runner.records import check_output, save_json


def _folder_parser():
    p = Parser(prog="bench.py imagenet_pipeline", allow_abbrev=False,
               description="Decoded + augmented images/s per CPU core: our ImageNet pipeline (data_folder.py) "
                           "against the official one (torchvision ImageFolder + PIL transforms), same run.")
    p.add_argument("--images", type=int, default=200, help="JPEGs written (default 200)")
    p.add_argument("--width", type=int, default=500, help="image width (default 500; ImageNet's typical 500x375)")
    p.add_argument("--height", type=int, default=375, help="image height (default 375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--image_size", type=int, default=224, help="train crop / val crop side (default 224)")
    p.add_argument("--batch_size", type=int, default=50, help="batch size (default 50)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians reported (default 5)")
    p.add_argument("--data_dir", help="an existing ImageFolder (train/, val/) instead of generated JPEGs")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    return p


def _write_jpegs(root, n, width, height, quality, seed=0, splits=("train", "val")):
    """n JPEGs per split (10 classes, train/ and val/ alike) of smooth colour fields with detail and noise:
    about the entropy, hence the decode cost, of photographs at that size (the mean file size is reported)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for split in splits:
        for i in range(n):
            folder = os.path.join(root, split, f"n{i % 10:08d}")
            os.makedirs(folder, exist_ok=True)
            f = rng.uniform(5, 40, 3)
            img = np.stack([np.sin(x / f[0] + rng.uniform(0, 6)) * np.cos(y / f[1]) * 80 + 128,
                            (x * y / (f[2] * 400)) % 256, np.hypot(x - width / 2, y - height / 2) % 256], -1)
            img += rng.normal(0, 25, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{split}_{i}.JPEG"), quality=quality)


def _official_datasets(root, size):
    """The official script's train and val datasets (nblt/RWP train_rwp_imagenet.py)."""
    from torchvision import datasets, transforms
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train = datasets.ImageFolder(os.path.join(root, "train"), transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    val = datasets.ImageFolder(os.path.join(root, "val"), transforms.Compose([
        transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]))
    return train, val


def _decode_stages(files, size, repeats):
    """Where a training image's time goes, ms per image (best of `repeats` passes over `files`): the
    full JPEG decode (Pillow); the decode at 1/8 DCT scale, which still entropy-decodes the whole file
    (so: the floor of any decoder that reads the file); the crop + resize of ours (torch's uint8
    antialiased kernel) and of the official transform (torchvision resized_crop on a PIL image).
    (The caller passes at most 200 files: they are held decoded.)"""
    import random
    import numpy as np
    from PIL import Image
    import torchvision.transforms.functional as TF
    import data_folder
    decoded = []
    for f in files:
        with Image.open(f) as im:
            decoded.append(im.convert("RGB"))
    boxes = [data_folder.crop_params(im.size[1], im.size[0], random.Random(i)) for i, im in enumerate(decoded)]
    arrays = [np.asarray(im) for im in decoded]

    def decode(scale):
        for f in files:
            with Image.open(f) as im:
                if scale > 1:
                    im.draft(im.mode, (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                im.load()

    def ours():
        for a, (top, left, h, w) in zip(arrays, boxes):
            data_folder._resize(a[top:top + h, left:left + w].copy(), size, size)

    def official():
        for im, (top, left, h, w) in zip(decoded, boxes):
            TF.resized_crop(im, top, left, h, w, [size, size])

    stages = {"decode_full": lambda: decode(1), "decode_at_one_eighth": lambda: decode(8),
              "crop_resize_ours": ours, "crop_resize_official": official}
    best = {}
    for name, fn in stages.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = round(min(times) / len(files) * 1e3, 4)
    return best


def _reduced_difference(files, size):
    """--reduced_decode against the full-size decode, same crop draws (seed i for file i): how many
    crops change, their mean absolute pixel difference (levels, over the changed crops) and the max."""
    import random
    import numpy as np
    import data_folder
    changed, total, worst = 0, 0.0, 0
    for i, f in enumerate(files):
        full = data_folder.load_train(f, size, random.Random(i)).astype(np.int16)
        diff = np.abs(data_folder.load_train(f, size, random.Random(i), reduced=True).astype(np.int16) - full)
        if diff.any():
            changed, total, worst = changed + 1, total + float(diff.mean()), max(worst, int(diff.max()))
    return dict(crops=len(files), crops_changed=changed, mean_abs_diff=round(total / changed, 3) if changed else 0.0,
                max_abs_diff=worst)


def bench_imagenet_pipeline(argv):
    """Per-core rates (one process, one thread, no DataLoader: the work one worker does per batch) of
    ours (decode + crop + resize to uint8 batches; flip and normalisation run on the device) and the
    official pipeline (per-sample PIL decode, transforms, ToTensor, Normalize, default_collate), train
    and val, interleaved round by round (order alternating); then each through a DataLoader with one
    worker, also interleaved (a whole pipeline: worker + transfer to the main process)."""
    import statistics
    import tempfile
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    import data_folder
    args = _folder_parser().parse_args(argv)
    for k in ("images", "width", "height", "image_size", "batch_size", "repeats"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 1")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: {args.quality} must be in 1..100")
    if args.json is not None:
        check_output("--json", args.json)
    torch.set_num_threads(1)
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_imagenet_")
        root = tmp.name
        _write_jpegs(root, args.images, args.width, args.height, args.quality)
    try:
        folder = data_folder.FolderData(root)
        files = [os.path.join(folder.train[0], os.fsdecode(p)) for p in folder.train[1]]
        mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024
        n = len(files)
        order = np.arange(n)
        bs, size = args.batch_size, args.image_size
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        ours = {"train": data_folder._Batches(folder.train[0], folder.train[1], folder.train[2], batches, size,
                                              train=True, replace=True, base=1, flip=True),
                "train_reduced": data_folder._Batches(folder.train[0], folder.train[1], folder.train[2], batches,
                                                      size, train=True, replace=True, base=1, flip=True, reduced=True),
                "val": data_folder._Batches(folder.val[0], folder.val[1], folder.val[2],
                                            [np.arange(len(folder.val[1]))[i:i + bs]
                                             for i in range(0, len(folder.val[1]), bs)], size, train=False,
                                            replace=False)}
        official = dict(zip(("train", "val"), _official_datasets(root, size)))
        from torch.utils.data import default_collate

        def counted(batch):  # images built (a run of unreadable files in --data_dir stops the bench)
            data_folder._report(batch[3])
            return len(batch[1])

        def run_ours(split):
            ds = ours[split]
            return sum(counted(ds[b]) for b in range(len(ds)))

        def run_reduced(split):  # --reduced_decode (training only; validation is always full size)
            return run_ours(split + "_reduced")

        def run_official(split):
            ds, count = official[split], 0
            for i in range(0, len(ds), bs):
                x, y = default_collate([ds[j] for j in range(i, min(i + bs, len(ds)))])
                count += len(y)
            return count

        def loader_ours(split):
            return sum(counted(b) for b in DataLoader(ours[split], batch_size=None, num_workers=1))

        def loader_official(split):
            return sum(len(y) for _, y in DataLoader(official[split], batch_size=bs, num_workers=1))

        sides = {"ours": run_ours, "official": run_official, "ours_reduced": run_reduced}
        def loader_reduced(split):
            return loader_ours(split + "_reduced")

        loaders = {"ours": loader_ours, "official": loader_official, "ours_reduced": loader_reduced}
        results = {}
        load_start = list(os.getloadavg())
        for label, fns in (("in_process", sides), ("dataloader_1_worker", loaders)):
            for split in ("train", "val"):
                names = [k for k in fns if split == "train" or k != "ours_reduced"]
                rates = {k: [] for k in names}
                for r in range(args.repeats):
                    for name in (names if r % 2 == 0 else names[::-1]):  # alternate who goes first
                        t0 = time.perf_counter()
                        try:
                            count = fns[name](split)
                        except Exception as e:  # (the official pipeline has no answer to a bad file)
                            if name != "official":
                                raise
                            raise UsageError(f"--data_dir: the official pipeline (torchvision ImageFolder) cannot "
                                             f"read a file of {root} ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:160] if str(e) else ''}); the comparison "
                                             "needs a folder whose images all decode") from None
                        rates[name].append(count / (time.perf_counter() - t0))
                results[f"{label}/{split}"] = {k: statistics.median(v) for k, v in rates.items()} | {
                    "all": rates, "speedup": statistics.median(a / b for a, b in zip(rates["ours"], rates["official"]))}
                if "ours_reduced" in rates:  # the speed option against our full-size decode, same rounds
                    results[f"{label}/{split}"]["reduced_speedup"] = statistics.median(
                        a / b for a, b in zip(rates["ours_reduced"], rates["ours"]))
        stages = _decode_stages(files[:200], size, args.repeats)
        reduced = _reduced_difference(files[:200], size)
        report = dict(bench="bench.py imagenet_pipeline", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      command=" ".join(["python", "bench.py", "imagenet_pipeline", *argv]),
                      device=device_name(torch.device("cpu")), cpus=os.cpu_count(), torch=torch.__version__,
                      pillow=__import__("PIL").__version__, images=n, mean_file_kb=round(mean_kb, 1),
                      image=f"{args.width}x{args.height} q{args.quality}" if args.data_dir is None else args.data_dir,
                      image_size=size, batch_size=bs, repeats=args.repeats, loadavg_start=load_start,
                      loadavg_end=list(os.getloadavg()), results=results, stages_ms=stages,
                      reduced_decode=reduced)
    finally:
        if tmp is not None:
            tmp.cleanup()
    lines = [f"bench.py imagenet_pipeline: {n} images {report['image']} (mean {mean_kb:.0f} KB), crop {size}, "
             f"batch {bs} | {report['device']} | torch {torch.__version__}, Pillow {report['pillow']} | {report['date']}",
             f"machine load: loadavg {load_start[0]:.2f}→{report['loadavg_end'][0]:.2f}", "",
             "| pipeline | split | ours img/s | official img/s | ours / official |", "|---|---|---:|---:|---:|"]
    for key, r in results.items():
        label, split = key.split("/")
        lines.append(f"| {label.replace('_', ' ')} | {split} | {r['ours']:.0f} | {r['official']:.0f} | {r['speedup']:.2f} |")
    lines.append(f"(median of {args.repeats} interleaved rounds; in process = one core, one thread; "
                 "ours / official = median of the per-round ratios)")
    lines.append("--reduced_decode (training crops): " + ", ".join(
        f"{label.replace('_', ' ')} {results[label + '/train']['ours_reduced']:.0f} img/s, "
        f"{results[label + '/train']['reduced_speedup']:.2f}x the full-size decode" for label in ("in_process", "dataloader_1_worker"))
        + f"; pixels vs the full-size decode: {reduced['crops_changed']} of {reduced['crops']} crops differ, "
          f"mean |diff| {reduced['mean_abs_diff']:.2f} levels over those, max {reduced['max_abs_diff']}")
    lines.append("per training image, ms (best of the rounds): " + ", ".join(
        f"{k.replace('_', ' ').replace('one eighth', '1/8 DCT scale')} {v:.3f}" for k, v in stages.items()))
    print("\n".join(lines), flush=True)
    if args.json:
        save_json(args.json, report)
    return report
