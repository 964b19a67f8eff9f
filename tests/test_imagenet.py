"""--dataset imagenet on a small real ImageFolder written here (JPEGs of mixed sizes, one grayscale,
one CMYK, one PNG named .JPEG): the pipeline against torchvision, errors, a corrupt file, exact resume
(SIGTERM mid-epoch in process; SIGKILL with workers), two torchrun nodes on localhost running RWP's
clean/perturbed split over 4 processes, and the SLURM example's commands."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_folder
import main
from data_utils import Augment, DataError
from conftest import ROOT
from imagefolder import write_image_folder
from test_main import free_port, rows, run, sigterm_at_step

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 18 training images, batch 4: 5 steps an epoch (the last batch holds 2); 9 validation images
SMALL = ["--dataset", "imagenet", "--image_size", "32", "--model", "wrn10_1", "--batch_size", "4",
         "--eval_batch_size", "4", "--lr", "0.05", "--clip_norm", "0", "--device", "cpu", "--seed", "1"]
STRIP = ("epoch_time_s",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_image_folder(str(tmp_path_factory.mktemp("imagenet") / "data")))


pytestmark = pytest.mark.usefixtures("one_thread")  # the subprocesses run with one thread: the same arithmetic


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in rows(run_dir)]


# ----------------------------------------------------------------------------- the pipeline

def _photo_jpeg(path, w=500, h=375):
    """A JPEG with fine detail (noise) up to the crop edges, where a resize that reads pixels outside
    the crop box shows."""
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(np.sin(x / 17) + np.cos(y / 23)) * 60 + 128, (x / 2) % 256, (y * 0.6) % 256], -1)
    img += np.random.default_rng(0).normal(0, 25, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_decode_matches_torchvision_transforms(tmp_path):
    """Validation = Resize(S·256/224) + CenterCrop(S); training = resized_crop of our crop box: equal up
    to rounding where decoded at full size (the default, every S); the reduced-DCT speed option
    (reduced=True) changes the crops whose box is ≥ 2·S (S 32 here), close to but not the official pixels."""
    from PIL import Image
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    path = _photo_jpeg(str(tmp_path / "a.jpg"))
    full = Image.open(path).convert("RGB")
    for size in (224, 32):
        ours = data_folder.load_val(path, size).transpose(1, 2, 0).astype(float)
        ref = np.asarray(T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])(full)).astype(float)
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5
        changed = 0
        for seed in range(5):
            top, left, h, w = data_folder.crop_params(375, 500, random.Random(seed))
            ours = data_folder.load_train(path, size, random.Random(seed)).transpose(1, 2, 0).astype(float)
            ref = np.asarray(TF.resized_crop(full, top, left, h, w, [size, size])).astype(float)
            assert ours.shape == (size, size, 3)
            assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5, (size, seed)
            fast = data_folder.load_train(path, size, random.Random(seed), reduced=True).transpose(1, 2, 0)
            d = np.abs(fast.astype(float) - ref)
            if min(h, w) < 2 * size:  # no reduced DCT size keeps S pixels across the box: full decode
                assert np.array_equal(fast, ours)
            else:
                changed += 1
                assert 0 < d.mean() < 4.0, (size, seed)
        assert (changed > 0) == (size == 32)  # at 224 no box of a 500×375 image is ≥ 448 a side


def test_reduced_decode_reaches_the_loader_and_only_for_imagenet(data, tmp_path, capsys, monkeypatch):
    import runner.training
    assert main.main(["--dataset", "cifar10", "--reduced_decode", "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reduced_decode: only for imagenet" in err
    seen = []
    real = data_folder.FolderTrainLoader.__init__

    def init(self, *args, **kwargs):
        seen.append(kwargs["reduced_decode"])
        real(self, *args, **kwargs)
    monkeypatch.setattr(data_folder.FolderTrainLoader, "__init__", init)
    for flag in ("--reduced_decode", "--no-reduced_decode"):
        cfg, _ = main.parse_config([*SMALL, "--data_dir", data, "--epochs", "1", flag])
        runner.training.Trainer(cfg, str(tmp_path))
    assert seen == [True, False]


def test_grayscale_cmyk_and_png_named_jpeg_decode_to_rgb(data):
    """ImageNet's odd files: each becomes RGB as torchvision's loader (PIL convert("RGB")) makes it."""
    from PIL import Image
    for path in (os.path.join(data, "train", "n00000000", "train_0_0.JPEG"),   # grayscale JPEG
                 os.path.join(data, "train", "n00000001", "train_1_0.JPEG"),   # CMYK JPEG
                 os.path.join(data, "val", "n00000002", "val_2_0.JPEG")):      # a PNG
        with Image.open(path) as im:
            assert im.mode in ("L", "CMYK", "RGB") and (im.format == "PNG") == path.endswith("val_2_0.JPEG")
            ref = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR, box=(0, 0) + im.size))
        ours = data_folder.load_val(path, 32).transpose(1, 2, 0)
        assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
        # the same colours (centre crop vs the whole image: compare channel means loosely)
        assert np.abs(ours.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() < 25, path


def test_crop_params_follow_random_resized_crop():
    rng = random.Random(0)
    for _ in range(2000):
        top, left, h, w = data_folder.crop_params(375, 500, rng)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # no box fits in ten tries: torchvision's fallback, the centre crop of the clamped ratio
    assert data_folder.crop_params(10, 1000, random.Random(0)) == (0, 493, 10, 13)


def test_batches_do_not_depend_on_workers_and_start_anywhere(data):
    aug = Augment(data_folder.IMAGENET_MEAN, data_folder.IMAGENET_STD)
    folder = data_folder.FolderData(data)
    assert folder.classes == ["n00000000", "n00000001", "n00000002"]

    def batches(workers, start=0, **kw):
        loader = data_folder.FolderTrainLoader(folder, 4, 32, aug, device="cpu", seed=3, workers=workers, **kw)
        loader.set_epoch(1)
        return list(loader.iter_from(start))
    ref = batches(0)
    assert len(ref) == 5 and [len(y) for _, y in ref] == [4, 4, 4, 4, 2]
    for (x, y), (x2, y2) in zip(ref, batches(2)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y), (x2, y2) in zip(ref[3:], batches(2, start=3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # flips happen (per sample), crops differ between epochs; x is normalised float (B, 3, 32, 32)
    assert ref[0][0].shape == (4, 3, 32, 32) and ref[0][0].dtype == torch.float32
    # two shards of one stream: disjoint, together all but the odd sample
    seen = []
    for shard in (0, 1):
        loader = data_folder.FolderTrainLoader(folder, 3, 32, aug, device="cpu", shard=shard, num_shards=2)
        seen += [int(i) for i in loader._indices()]
    assert len(seen) == len(set(seen)) == 18
    # validation: every sample exactly once over the shards, none duplicated
    ys = [y for shard in range(4) for _, y in folder.test_batches(2, 32, aug, device="cpu", shard=shard, num_shards=4)]
    assert sorted(torch.cat(ys).tolist()) == sorted(folder.val[2].tolist()) and len(torch.cat(ys)) == 9


def test_folder_errors_are_one_line(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(data, "train"), bad / "train")
    with pytest.raises(DataError, match=r"no val/ folder in .*expected .*/train/<class>/\*\.JPEG"):
        data_folder.FolderData(str(bad))
    shutil.copytree(os.path.join(data, "val"), bad / "val")
    shutil.rmtree(bad / "val" / "n00000001")
    with pytest.raises(DataError, match="class folders of val/ differ from train/'s .missing in val: n00000001"):
        data_folder.FolderData(str(bad))
    os.makedirs(bad / "val" / "n00000001")
    with pytest.raises(DataError, match=r"class folder .*val/n00000001 holds no image"):
        data_folder.FolderData(str(bad))
    assert main.main([*SMALL, "--data_dir", str(bad), "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no image" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs")  # nothing left behind
    # values a folder dataset cannot use, or beyond its files: one line each, before any folder exists
    for extra, message in ((["--train_size", "19"], "train_size: 19 is more than the 18 images in"),
                           (["--test_size", "10"], "test_size: 10 is more than the 9 images in"),
                           (["--crop_padding", "8"], "crop_padding: not used by imagenet"),
                           (["--pad_fill", "0"], "pad_fill: not used by imagenet"),
                           (["--image_size", "2000"], "image_size: 2000 is out of range (must be ≥ 8 and ≤ 1024)")):
        assert main.main([*SMALL, "--data_dir", data, *extra, "--out_dir", str(tmp_path / "runs")]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main.main(["--dataset", "cifar10", "--image_size", "64"]) == 2
    assert "image_size: only for imagenet" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_tinyimagenet_layout_and_hidden_files(data, tmp_path):
    """TinyImageNet keeps training images in train/<class>/images/: found, as torchvision's ImageFolder
    finds them (same files, same order); macOS's ._name.JPEG files are not images and are skipped."""
    from torchvision.datasets import ImageFolder
    tiny = tmp_path / "tiny"
    for split in ("train", "val"):
        for c in sorted(os.listdir(os.path.join(data, split))):
            sub = tiny / split / c / ("images" if split == "train" else "")
            shutil.copytree(os.path.join(data, split, c), sub)
    (tiny / "train" / "n00000000" / "images" / "._train_0_1.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    os.makedirs(tiny / "train" / ".ipynb_checkpoints")  # hidden folders are neither classes nor searched
    shutil.copy(tiny / "train" / "n00000001" / "images" / "train_1_1.JPEG", tiny / "train" / ".ipynb_checkpoints")
    os.rename(tiny / "train" / "n00000001" / "images" / "train_1_2.JPEG",
              tiny / "train" / "n00000001" / "images" / "naïve café 1.JPEG")  # any file name
    folder = data_folder.FolderData(str(tiny))
    ours = [os.path.join(folder.train[0], os.fsdecode(p)) for p in folder.train[1]]
    shutil.rmtree(tiny / "train" / ".ipynb_checkpoints")  # (torchvision would take it for a class)
    ref = [(path, t) for path, t in ImageFolder(str(tiny / "train")).samples if not os.path.basename(path).startswith(".")]
    assert ours == [path for path, _ in ref] and list(folder.train[2]) == [t for _, t in ref] and len(ours) == 18
    assert data_folder.load_train(ours[[os.path.basename(p) for p in ours].index("naïve café 1.JPEG")], 32,
                                  random.Random(0)).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- runs

def test_train_and_evaluate_end_to_end_with_a_corrupt_file(data, tmp_path, capsys):
    """torchvision's ResNet-18 on the folder (classes from train/), workers > 0; a corrupt training
    JPEG is reported by path, replaced, and counted in every epoch's row; a corrupt validation JPEG is
    reported, left out of the test errors (8 of 9 images), and counted."""
    corrupt = tmp_path / "data"
    shutil.copytree(data, corrupt)
    broken = corrupt / "train" / "n00000002" / "train_2_3.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    broken_val = corrupt / "val" / "n00000001" / "val_1_2.JPEG"
    broken_val.write_bytes(open(broken_val, "rb").read()[:100])  # truncated
    code, run_dir = run(tmp_path, *SMALL, "--data_dir", str(corrupt), "--model", "tv_resnet18", "--epochs", "2",
                        "--workers", "2", "--optimizer", "sgd")
    assert code == 0
    err = capsys.readouterr().err
    assert f"unreadable image {broken}" in err and "replaced by" in err
    assert f"unreadable image {broken_val}" in err and "left out" in err
    r = rows(run_dir)
    assert [x["bad_images"] for x in r] == [1, 1] and [x["bad_test_images"] for x in r] == [1, 1]
    for x in r:  # errors over the 8 readable validation images
        assert abs(x["test_error"] * 8 / 100 - round(x["test_error"] * 8 / 100)) < 1e-9
    capsys.readouterr()
    assert main.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(8 images; 1 unreadable, left out)" in out and f"err {r[-1]['test_error']:.2f}%" in out
    assert all(x["test_error_top5"] is not None and 0 <= x["test_error_top5"] <= x["test_error"] for x in r)
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["final_test_error_top5"] == r[-1]["test_error_top5"] and summary["best_test_error_top5"] is not None
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert state["fc.weight"].shape == (3, 512)  # the class count follows the train folders
    assert r[0]["images"] == 18
    from runner.loading import load_run
    model, cfg = load_run(str(run_dir))
    assert cfg.dataset == "imagenet" and model.fc.out_features == 3
    # report.py: a top-5 column for imagenet groups; an older run without top-5 shows "–", no error
    import report
    old = tmp_path / "old" / "r"
    shutil.copytree(run_dir, old)
    summary = {k: v for k, v in summary.items() if "top5" not in k}
    (old / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "| final top-5 error % |" in table and f"| {r[-1]['test_error_top5']:.2f} ± – |" in table
    assert report.main([str(tmp_path / "old")]) == 0
    assert "| – |" in capsys.readouterr().out.split("\n")[2]


def test_unreadable_files_in_a_row_fail_the_run_with_the_checkpoint_kept(data, tmp_path, monkeypatch, capsys):
    """A run of unreadable files mid-run (a damaged data folder): one line, summary.json "failed",
    exit 1, the last checkpoint intact; mended, --resume finishes the run. The run of validation
    images is counted across batches (here 1 | 2 of batches of 4)."""
    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    monkeypatch.setattr(data_folder, "MAX_REPLACEMENTS", 2)
    args = [*SMALL, "--data_dir", str(damaged), "--epochs", "2", "--optimizer", "sgd"]
    assert run(tmp_path, *args)[0] == 0  # the whole run, for comparison
    files = sorted((damaged / "val" / "n00000001").iterdir())  # validation images 3, 4, 5
    saved = [f.read_bytes() for f in files]
    # the damage appears after epoch 1
    real, calls = data_folder.FolderData.test_batches, []

    def damage_on_second_call(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            for f in files:
                f.write_bytes(b"garbage")
        return real(self, *a, **k)
    monkeypatch.setattr(data_folder.FolderData, "test_batches", damage_on_second_call)
    code, run_dir = run(tmp_path, *args, name="d")
    assert code == 1
    err = capsys.readouterr().err
    assert "2 unreadable validation images in a row" in err and f"--resume {run_dir}" in err
    assert "Traceback" not in err
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "failed" and "unreadable" in summary["message"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    for f, b in zip(files, saved):
        f.write_bytes(b)
    monkeypatch.setattr(data_folder.FolderData, "test_batches", real)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert metrics(run_dir) == metrics(tmp_path / "runs" / "r")
    # training: 2 unreadable files in a row (the sample's file and the next) stop the run the same way
    for name in ("train_1_1.JPEG", "train_1_2.JPEG"):
        (damaged / "train" / "n00000001" / name).write_bytes(b"garbage")
    code, run_dir = run(tmp_path, *args, "--workers", "2", name="t")
    assert code == 1
    err = capsys.readouterr().err
    assert "2 unreadable images in a row" in err and "Traceback" not in err
    assert "no checkpoint yet; restore the unreadable files (training files may also be deleted), then start the run again" in err
    assert json.load(open(run_dir / "summary.json"))["status"] == "failed"


def test_a_run_of_unreadable_training_files_counts_samples_and_names_each_file_once(data, tmp_path, capsys):
    """Three unreadable files in a row: samples 7, 8, 9 each walk on to the next readable file (7 passes
    8 and 9 on its way): 3 samples replaced, each file named once."""
    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    broken = [damaged / "train" / "n00000001" / f"train_1_{k}.JPEG" for k in (1, 2, 3)]
    for f in broken:
        f.write_bytes(b"garbage")
    folder = data_folder.FolderData(str(damaged))
    loader = data_folder.FolderTrainLoader(folder, 18, 32, Augment(data_folder.IMAGENET_MEAN, data_folder.IMAGENET_STD),
                                           device="cpu")
    capsys.readouterr()
    assert [len(y) for _, y in loader] == [18] and loader.bad_images == 3
    err = capsys.readouterr().err
    assert all(err.count(f"unreadable image {f} ") == 1 for f in broken) and err.count("\n") == 3


def test_resume_after_deleting_an_unreadable_training_file(data, tmp_path, monkeypatch):
    """Mending by deleting an unreadable training file changes the training files only: the resume
    goes on, and the log says so; the classes and validation files must be the run's."""
    mended = tmp_path / "data"
    shutil.copytree(data, mended)
    args = [*SMALL, "--data_dir", str(mended), "--optimizer", "sgd", "--epochs", "2", "--workers", "0"]
    real = sigterm_at_step(monkeypatch, 6)
    code, run_dir = run(tmp_path, *args)
    assert code == 143
    monkeypatch.setattr(main.Trainer, "closure_for", real)
    os.remove(mended / "train" / "n00000002" / "train_2_3.JPEG")
    assert main.main(["--resume", str(run_dir)]) == 0
    assert (f"note: the training files in {mended} differ from the ones this run started with (train files 18 → 17); "
            "continuing with them") in open(run_dir / "log.txt").read()
    assert json.load(open(run_dir / "summary.json"))["data"]["train_files"] == 17
    # a run saved with a value earlier versions accepted and ignored (padding with imagenet) still loads
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    saved["config"]["crop_padding"] = 8
    torch.save(saved, run_dir / "checkpoint.pt")
    config_yaml = (run_dir / "config.yaml").read_text()  # (those versions wrote it there too)
    assert "crop_padding: 4\n" in config_yaml
    (run_dir / "config.yaml").write_text(config_yaml.replace("crop_padding: 4\n", "crop_padding: 8\n"))
    assert main.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0


def test_unaugmented_training_still_replaces_unreadable_images(data, tmp_path):
    """--augment false (centre crops): an unreadable training image is still replaced, never dropped
    (every batch full), and counted."""
    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    (damaged / "train" / "n00000002" / "train_2_3.JPEG").write_bytes(b"garbage")
    folder = data_folder.FolderData(str(damaged))
    loader = data_folder.FolderTrainLoader(folder, 4, 32, Augment(data_folder.IMAGENET_MEAN, data_folder.IMAGENET_STD),
                                           device="cpu", random_crop=False, flip=False)
    sizes = [len(y) for _, y in loader]
    assert sizes == [4, 4, 4, 4, 2] and loader.bad_images == 1


def test_sigterm_mid_epoch_then_resume_is_exact(data, tmp_path, monkeypatch, capsys):
    """RWP (two loaders a step): SIGTERM at step 7 (epoch 2, step 2), resume: the metrics of an
    uninterrupted run, and the resumed epoch decodes only the batches it still needs. A run is tied
    to its data: --resume / --evaluate on a folder with other classes or files is refused, the same
    data moved is fine (--evaluate --data_dir), and report.py keeps runs on different data apart."""
    args = [*SMALL, "--data_dir", data, "--optimizer", "rwp", "--epochs", "2", "--workers", "0", "--dropout", "0.2"]
    assert run(tmp_path, *args, name="full")[0] == 0
    real = sigterm_at_step(monkeypatch, 7)
    code, part = run(tmp_path, *args, name="part")
    assert code == 143
    assert torch.load(part / "checkpoint.pt", weights_only=True)["partial"]["step"] == 2
    other = tmp_path / "other"  # the same images, one class renamed (the class indices move)
    shutil.copytree(data, other)
    for split in ("train", "val"):
        os.rename(other / split / "n00000000", other / split / "zz")
    capsys.readouterr()
    assert main.main(["--resume", str(part), "--data_dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the data this run was trained on (class names differ, val names differ)" in err
    saved = torch.load(part / "checkpoint.pt", weights_only=True)  # as an earlier version wrote it: no data record
    del saved["data"]
    torch.save(saved, part / "checkpoint.pt")
    decoded = []
    real_get = data_folder._Batches.__getitem__
    monkeypatch.setattr(data_folder._Batches, "__getitem__", lambda self, b: decoded.append(b) or real_get(self, b))
    assert main.main(["--resume", str(part)]) == 0
    assert metrics(part) == metrics(tmp_path / "runs" / "full")
    assert sorted(decoded[:6]) == [2, 2, 3, 3, 4, 4]  # both loaders, from batch 2 on
    assert "note: the checkpoint records no data (an earlier version wrote it)" in open(part / "log.txt").read()
    summary = json.load(open(part / "summary.json"))
    assert summary["data"] == torch.load(part / "checkpoint.pt", weights_only=True)["data"]
    assert summary["data"]["classes"] == 3 and summary["data"]["train_files"] == 18
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    capsys.readouterr()
    assert main.main(["--evaluate", str(part), "--data_dir", str(moved), "--device", "cpu"]) == 0
    assert f"err {metrics(part)[-1]['test_error']:.2f}%" in capsys.readouterr().out
    assert main.main(["--evaluate", str(part), "--data_dir", str(other)]) == 2
    assert "--evaluate uses the run's own test set" in capsys.readouterr().err
    monkeypatch.setattr(main.Trainer, "closure_for", real)
    assert run(tmp_path, *[a if a != data else str(other) for a in args], name="on_other")[0] == 0
    import report
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    rows_ = [line for line in table.splitlines() if line.startswith("| imagenet")]
    assert len(rows_) == 2 and all("data=3 classes, 18/9 files #" in line for line in rows_), table
    assert {line.split("|")[5].strip() for line in rows_} == {"2", "1"}  # full + part; on_other
    # a run from before the data was recorded is a group of its own; a malformed record is listed apart
    for name, data_ in (("old", None), ("bad", "x")):
        shutil.copytree(part, tmp_path / "runs" / name)
        summary_ = json.load(open(tmp_path / "runs" / name / "summary.json"))
        summary_.pop("data") if data_ is None else summary_.update(data=data_)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps(summary_))
    assert report.main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert sum(line.startswith("| imagenet") and "data=unrecorded" in line for line in table.splitlines()) == 1
    assert "data is 'x', not the record of a folder dataset" in table


def test_sigkill_then_resume_with_workers_equals_uninterrupted(data, tmp_path):
    common = [*SMALL, "--data_dir", data, "--optimizer", "sgd", "--epochs", "4", "--dropout", "0.2"]
    args = [*common, "--workers", "2", "--out_dir", str(tmp_path / "runs")]
    assert run(tmp_path, *common, "--workers", "0", name="ref")[0] == 0
    run_dir = tmp_path / "runs" / "killed"
    pid = os.fork()  # a child of this process (torch already imported): SIGKILLed below
    if pid == 0:
        code = 1
        try:
            code = main.main([*args, "--name", "killed"])
        finally:
            os._exit(code)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(0).uniform(0, 0.15))  # in epoch 2 (0.2 s an epoch), or mid-checkpoint
    if os.waitpid(pid, os.WNOHANG) != (0, 0):
        pytest.fail("the run ended before it could be killed")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert main.main(["--resume", str(run_dir), "--workers", "1"]) == 0  # (in this process: one start less)
    assert metrics(run_dir) == metrics(tmp_path / "runs" / "ref")


def test_two_torchrun_nodes_on_localhost_run_parallel_rwp_on_four_processes(data, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous, 2 gloo processes each): RWP's clean ranks 0, 2
    and perturbed ranks 1, 3; one epoch, evaluated over the 4 ranks."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test16",
           "main.py", *SMALL, "--data_dir", data, "--optimizer", "rwp", "--epochs", "1", "--batch_size", "2",
           "--workers", "0", "--out_dir", str(tmp_path / "runs"), "--name", "nodes"]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True) for _ in range(2)]
    try:
        outs = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert [a.returncode for a in agents] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    log = open(tmp_path / "runs" / "nodes" / "log.txt").read()
    assert "×4 ranks" in log
    r = rows(tmp_path / "runs" / "nodes")
    # 18 images, 2 shards per branch of 9, batches of 2: 4 steps, 4 ranks x 2 images each
    assert len(r) == 1 and r[0]["images"] == 4 * 4 * 2 and r[0]["test_error_top5"] is not None
    wrong = 9 * r[0]["test_error"] / 100  # each of the 9 validation images counted once: a whole number
    assert abs(wrong - round(wrong)) < 1e-9


def test_torchrun_ranks_agree_to_stop_when_one_ranks_validation_images_are_unreadable(tmp_path):
    """Two gloo processes; every validation image of rank 1 (17 of 34) is unreadable: rank 1 has no
    batch to evaluate and reaches 16 in a row. Both ranks stop at the same point (no hang): one line
    naming rank 1, summary.json "failed", exit 1, the checkpoint of epoch 1 kept."""
    root = tmp_path / "data"
    write_image_folder(str(root), classes=2, train_per_class=4, val_per_class=17)
    val = sorted(str(p.relative_to(root / "val")) for p in (root / "val").rglob("*.JPEG"))
    for rel in val[1::2]:  # rank 1 takes images 1, 3, 5, ...
        (root / "val" / rel).write_bytes(b"garbage")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "main.py", *SMALL, "--data_dir", str(root), "--optimizer", "sgd", "--epochs", "2", "--eval_every", "2",
           "--workers", "0", "--out_dir", str(tmp_path / "runs"), "--name", "r"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=120)  # (a hang, as before the ranks agreed, fails here)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    run_dir = tmp_path / "runs" / "r"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "failed", err[-3000:]
    assert summary["message"].startswith("rank 1: imagenet: 16 unreadable validation images in a row")
    assert err.count("16 unreadable validation images in a row") == 1
    assert 'main.py", line' not in err  # no traceback of ours (torchrun adds its own report)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------- recipes

def test_slurm_script_commands(tmp_path):
    """The SLURM example (DRY_RUN=1): srun torchrun with c10d rendezvous on the first node; one command
    for the first start and every requeue (--on_existing resume: main.py continues the folder)."""
    script = os.path.join(ROOT, "recipes", "slurm_rwp_imagenet.sbatch")
    env = {**ENV, "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "8", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "64", "MASTER_ADDR": "node001", "OUT": str(tmp_path / "runs"),
           "DATA": "/data/imagenet"}
    first = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    cmd = first.stdout.strip().splitlines()[-1]
    for part in ("srun --kill-on-bad-exit=1 --ntasks-per-node=1", "torchrun --nnodes 8 --nproc_per_node 4",
                 "--rdzv_backend c10d --rdzv_endpoint node001:29500 --rdzv_id 4242",
                 "main.py --config configs/imagenet/imagenet_tv_resnet18_rwp.yaml --data_dir /data/imagenet",
                 "--batch_size 16", "--workers 15",
                 f"--out_dir {tmp_path / 'runs'} --name imagenet_tv_resnet18_rwp_s0 --on_existing resume"):
        assert part in cmd, cmd


def test_slurm_dry_run_as_documented_off_slurm(tmp_path):
    """The header's dry run, `DATA=... DRY_RUN=1 bash recipes/slurm_rwp_imagenet.sbatch`, with no
    SLURM_* variable and no MASTER_ADDR, with and without scontrol on PATH: this host is the endpoint."""
    import socket
    script = os.path.join(ROOT, "recipes", "slurm_rwp_imagenet.sbatch")
    bare = tmp_path / "bin"  # a PATH without scontrol: just what the script calls
    bare.mkdir()
    for tool in ("bash", "hostname", "dirname", "basename", "head"):
        os.symlink(shutil.which(tool), bare / tool)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_") and k != "MASTER_ADDR"}
    for path in (str(bare), env.get("PATH", "")):
        p = subprocess.run(["bash", script], env={**env, "PATH": path, "DATA": "/d", "DRY_RUN": "1"},
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert f"--rdzv_endpoint {socket.gethostname()}:29500" in p.stdout and "--nnodes 1 --nproc_per_node 4" in p.stdout


def test_imagenet_recipe_dry_run():
    p = subprocess.run(["bash", os.path.join(ROOT, "recipes", "rwp_imagenet.sh"), "--dry-run", "--data_dir", "/d"],
                       env={**ENV, "SEEDS": "0", "OUT": "runs/x"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any("configs/imagenet/imagenet_tv_resnet18_rwp.yaml" in l and "--data_dir /d" in l for l in lines)
    assert any("configs/imagenet/imagenet_tv_resnet18_sgd.yaml" in l for l in lines)
    assert any("configs/imagenet/imagenet_tv_resnet50_rwp.yaml" in l for l in lines)


def test_bench_imagenet_pipeline_quick(data, tmp_path, capsys):
    import bench
    out = tmp_path / "p.json"
    assert bench.main_cli(["imagenet_pipeline", "--images", "4", "--width", "60", "--height", "45",
                           "--image_size", "32", "--batch_size", "2", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 4 and set(report["results"]) == {
        "in_process/train", "in_process/val", "dataloader_1_worker/train", "dataloader_1_worker/val"}
    assert all(r["ours"] > 0 and r["official"] > 0 for r in report["results"].values())
    assert all(report["results"][f"{k}/train"]["ours_reduced"] > 0 for k in ("in_process", "dataloader_1_worker"))
    assert set(report["reduced_decode"]) == {"crops", "crops_changed", "mean_abs_diff", "max_abs_diff"}
    assert set(report["stages_ms"]) == {"decode_full", "decode_at_one_eighth", "crop_resize_ours",
                                        "crop_resize_official"} and min(report["stages_ms"].values()) > 0
    out = capsys.readouterr().out
    assert "| in process | train |" in out and "decode at 1/8 DCT scale" in out
    damaged = tmp_path / "damaged"  # the official pipeline cannot skip a bad file: one line, exit 2
    shutil.copytree(data, damaged)
    (damaged / "train" / "n00000001" / "train_1_1.JPEG").write_bytes(b"garbage")
    assert bench.main_cli(["imagenet_pipeline", "--data_dir", str(damaged), "--image_size", "32", "--batch_size", "4",
                           "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "the official pipeline (torchvision ImageFolder) cannot read a file" in err and "Traceback" not in err
    assert bench.main_cli(["imagenet_pipeline", "--quality", "0"]) == 2


def test_bench_training_step_at_imagenet_shape(tmp_path):
    """bench.py --dataset imagenet: synthetic batches of image_size (the file pipeline is timed by
    `bench.py imagenet_pipeline`, so the CIFAR pipeline phase is skipped)."""
    import bench
    out = tmp_path / "b.json"
    assert bench.main_cli(["--dataset", "imagenet", "--no-cutout", "--model", "wrn10_1", "--image_size", "40",
                           "--batch_size", "4", "--quick", "--optimizers", "sgd", "--eval_batch_size", "4",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pipeline"] is None and report["train"][0]["optimizer"] == "sgd"
    assert report["steps_per_epoch"] == 1281167 // 4 + 1  # ILSVRC-2012's training set
