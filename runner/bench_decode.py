"""`bench.py jpeg_decode`: where a GPU's ImageNet JPEGs should be decoded, in CPU worker processes
(the runner's pipeline) or on the GPU (nvJPEG), measured side by side on the same generated files.

    python bench.py jpeg_decode [--device cuda] [--workers 16] [--samples 2048] [--json out.json]

Both sides deliver the same thing, batches of RandomResizedCrop(--image_size) uint8 images:

- cpu_workers: data_folder.py's training batches (decode, at a reduced DCT scale where the crop box
  allows, crop, antialiased resize; data_folder._Batches) built whole in --workers DataLoader worker
  processes (min(--workers, CPUs, batches)), as the runner's loader builds them. images/s = samples /
  seconds of one pass; the median of --passes passes after one warm-up pass that starts the
  (persistent) workers. The copy to the device is not included.
- device: the files' bytes read into memory once; per batch one torchvision.io.decode_jpeg(list,
  device=D) call (nvJPEG on CUDA, batched; libjpeg-turbo in this one process on CPU), then per image
  a crop box (data_folder.crop_params: RandomResizedCrop's draws) resized to image_size by antialiased
  bilinear interpolation on the device. images/s of decode alone and of decode + crop + resize, the
  median of --passes passes after one warm-up pass, synchronised at the end of each pass.

--images distinct JPEGs (ImageNet's typical 500x375, quality 90; runner.bench_imagenet's generator)
are visited --samples times per pass (the file list wraps), so a pass is long enough to keep 16
workers busy without writing thousands of files.
"""
from __future__ import annotations

import datetime
import os
import statistics
import time

from runner.bench_step import device_name
from runner.config import Parser, UsageError
from runner.records import check_output, save_json


def _parser():
    p = Parser(prog="bench.py jpeg_decode", allow_abbrev=False,
               description="RandomResizedCrop uint8 batches/s from JPEGs: CPU DataLoader workers (data_folder.py) "
                           "against decoding on the device (torchvision.io.decode_jpeg), same files, same run.")
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs written (default 256)")
    p.add_argument("--samples", type=int, default=2048, help="images decoded per pass (default 2048; the files wrap)")
    p.add_argument("--width", type=int, default=500, help="image width (default 500)")
    p.add_argument("--height", type=int, default=375, help="image height (default 375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--image_size", type=int, default=224, help="crop side (default 224)")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--workers", type=int, default=16, help="CPU DataLoader workers (default 16; at most the CPUs)")
    p.add_argument("--passes", type=int, default=3, help="timed passes after one warm-up; medians (default 3)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where decode_jpeg decodes (default auto: cuda if available)")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    return p


def _batches(samples, batch_size):
    import numpy as np
    order = np.arange(samples)
    return [order[i:i + batch_size] for i in range(0, samples, batch_size)]


def _timed_passes(one_pass, passes):
    """(warm-up rate, [rates]) in images/s of `one_pass()` (which returns its image count)."""
    rates = []
    for _ in range(passes + 1):
        t0 = time.perf_counter()
        n = one_pass()
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1:]


def cpu_workers(folder, paths, args):
    """The runner's pipeline: whole training batches in DataLoader workers."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    import data_folder
    batches = _batches(args.samples, args.batch_size)
    workers = min(args.workers, data_folder._cpu_count(), len(batches))
    ds = data_folder._Batches(folder, paths, np.zeros(len(paths), dtype=np.int64), batches, args.image_size,
                              train=True, replace=True, base=1)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    warm, rates = _timed_passes(lambda: sum(len(b[1]) for b in loader), args.passes)
    return dict(workers=workers, images_per_s=statistics.median(rates), passes=rates, warmup_pass=warm)


def device_decode(folder, paths, args, device):
    """decode_jpeg on `device`, batched, then crop + resize there; decode alone and the whole."""
    import random
    import warnings
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    import data_folder
    data = [read_file(os.path.join(folder, p)) for p in paths]
    batches = _batches(args.samples, args.batch_size)
    s = args.image_size

    def one_pass(crop):
        for b in batches:
            with warnings.catch_warnings():  # (torchvision ≥ 0.29 deprecates its decoders for TorchCodec)
                warnings.simplefilter("ignore")
                images = decode_jpeg([data[i % len(data)] for i in b], mode=ImageReadMode.RGB, device=device)
            if crop:
                out = torch.empty(len(b), 3, s, s, dtype=torch.uint8, device=device)
                for k, (i, im) in enumerate(zip(b, images)):
                    top, left, h, w = data_folder.crop_params(im.shape[1], im.shape[2], random.Random(int(i)))
                    box = im[None, :, top:top + h, left:left + w].float()
                    out[k] = F.interpolate(box, size=(s, s), mode="bilinear", antialias=True,
                                           align_corners=False)[0].round_().clamp_(0, 255)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return args.samples

    result = {}
    for name, crop in (("decode", False), ("decode_crop_resize", True)):
        warm, rates = _timed_passes(lambda: one_pass(crop), args.passes)
        result[name] = dict(images_per_s=statistics.median(rates), passes=rates, warmup_pass=warm)
    return result


def _check(args):
    for k in ("images", "samples", "width", "height", "image_size", "batch_size", "passes"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 1")
    if args.workers < 0:
        raise UsageError(f"--workers: {args.workers} must be >= 0")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: {args.quality} must be in 1..100")
    if args.json is not None:
        check_output("--json", args.json)


def bench_jpeg_decode(argv):
    import tempfile
    import torch
    import torchvision
    from runner.bench_imagenet import _write_jpegs
    args = _parser().parse_args(argv)
    _check(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as root:
        _write_jpegs(root, args.images, args.width, args.height, args.quality, splits=("train",))
        folder = os.path.join(root, "train")
        paths = sorted(os.path.join(c, f) for c in os.listdir(folder) for f in os.listdir(os.path.join(folder, c)))
        mean_kb = sum(os.path.getsize(os.path.join(folder, p)) for p in paths) / len(paths) / 1024
        load_start = list(os.getloadavg())
        cpu = cpu_workers(folder, paths, args)
        on_device = device_decode(folder, paths, args, device)
    report = dict(bench="bench.py jpeg_decode", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join(["python", "bench.py", "jpeg_decode", *argv]), device=device_name(device),
                  device_type=device.type, cpus=os.cpu_count(), torch=torch.__version__,
                  torchvision=torchvision.__version__, images=args.images, samples=args.samples,
                  image=f"{args.width}x{args.height} q{args.quality}", mean_file_kb=round(mean_kb, 1),
                  image_size=args.image_size, batch_size=args.batch_size, loadavg_start=load_start,
                  loadavg_end=list(os.getloadavg()), cpu_workers=cpu, device_decode=on_device)
    print("\n".join([
        f"bench.py jpeg_decode: {args.samples} decodes of {args.images} JPEGs {report['image']} (mean {mean_kb:.0f} KB) "
        f"→ crop {args.image_size}, batch {args.batch_size} | {report['device']} | torch {torch.__version__}, "
        f"torchvision {torchvision.__version__} | {report['date']}", "",
        "| pipeline | images/s |", "|---|---:|",
        f"| CPU: data_folder batches in {cpu['workers']} DataLoader workers (decode + crop + resize) | "
        f"{cpu['images_per_s']:.0f} |",
        f"| {device.type}: decode_jpeg, batched (decode only) | {on_device['decode']['images_per_s']:.0f} |",
        f"| {device.type}: decode_jpeg + crop + resize on the device | "
        f"{on_device['decode_crop_resize']['images_per_s']:.0f} |",
        f"(median of {args.passes} passes after one warm-up pass)"]), flush=True)
    if args.json:
        save_json(args.json, report)
    return report
