"""Real usage: two runs into one folder, a full disk, names that collide, numbers that make no sense, a killed
write, Ctrl-C, and a resumed run that ends exactly where the uninterrupted one does."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import stage1_train
from conftest import ROOT, TINY_TRAIN, TRAIN_IDS, VAL_IDS, assert_user_error, run_script
from test_own_data import write_own_data

TINY_MULTITASK = ["--backbone", "tiny_unet", "--no-pretrained", "--crop-size", "24", "--batch-labeled", "1",
                  "--batch-unlabeled", "2", "--workers", "0", "--device", "cpu", "--print-every", "1"]


def weights(out):
    """What training changes in a run's last checkpoint: the weights, the teacher's, the optimiser, the schedule
    and the random state."""
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return {key: checkpoint[key] for key in ["step", "model", "teacher", "optimizer", "scheduler", "rng_state"]
            if key in checkpoint}


def assert_same_weights(a, b):
    """Equal bit for bit, tensor by tensor."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_weights(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_weights(x, y)
    else:
        assert a == b


def interrupted_at(monkeypatch, module, at):
    """Make `module`'s train_one_step raise KeyboardInterrupt (Ctrl-C) when called for the at-th time."""
    real, calls = module.train_one_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "train_one_step", step)


# ----------------------------------------------------------------------------- a resumed run is exact

@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stage1_run_ends_with_the_weights_of_one_never_stopped(voc_root, tmp_path, monkeypatch, workers):
    command = ["stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 6, "--save-every", 2,
               "--strong-aug", "--optimizer", "adamw", "--workers", workers]
    run_script(*command, "--out", tmp_path / "whole")
    interrupted_at(monkeypatch, stage1_train, 4)  # Ctrl-C during step 4: the checkpoint of step 2 is kept
    result = run_script(*command, "--out", tmp_path / "resumed", check=False)
    assert result.stderr.strip() == "interrupted: the same command continues from step 2, the last checkpoint"
    monkeypatch.undo()
    result = run_script(*command, "--out", tmp_path / "resumed")
    assert "continuing the run in" in result.stdout and "from step 2" in result.stdout
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "resumed"))
    assert (json.load(open(tmp_path / "whole" / "metrics.json")) == json.load(open(tmp_path / "resumed" / "metrics.json")))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_multitask_run_ends_with_the_weights_of_one_never_stopped(pseudo_masks, tmp_path, monkeypatch,
                                                                             workers):
    import stage3_multitask
    command = ["stage3_multitask.py", "--pseudo", pseudo_masks / "p1", *TINY_MULTITASK, "--iters", 5, "--save-every", 2,
               "--optimizer", "adamw", "--ema-decay", 0.5, "--workers", workers]
    run_script(*command, "--out", tmp_path / "whole")
    interrupted_at(monkeypatch, stage3_multitask, 4)
    run_script(*command, "--out", tmp_path / "resumed", check=False)
    monkeypatch.undo()
    run_script(*command, "--out", tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "resumed"))


def test_a_run_killed_at_any_moment_continues_to_the_same_weights_and_its_lock_is_not_stale(voc_root, tmp_path):
    """A real SIGKILL of a real process with loader workers; the same command then finishes the run. While the
    first run lives, a second command into its folder is refused, naming it."""
    command = [sys.executable, os.path.join(ROOT, "stage1_train.py"), "--data-root", voc_root, "--labeled", 4,
               *TINY_TRAIN, "--iters", 30, "--save-every", 3, "--workers", 1, "--strong-aug"]
    command = [str(c) for c in command]
    subprocess.run(command + ["--out", str(tmp_path / "whole")], check=True, capture_output=True, cwd=ROOT, timeout=600)
    first = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    history = tmp_path / "killed" / "history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 4):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run: the second command cannot come after the first has ended
    second = run_script("stage1_train.py", *command[2:], "--out", tmp_path / "killed", check=False)
    assert_user_error(second, f"--out {tmp_path / 'killed'} is in use by process {first.pid}", "wait for it to end")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / "killed" / "run.lock").exists()  # what a killed process leaves; it blocks nothing
    run_script("stage1_train.py", *command[2:], "--out", tmp_path / "killed")
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "killed"))
    assert not (tmp_path / "killed" / "run.lock").exists()


def test_ctrl_c_before_the_first_checkpoint_says_the_run_starts_again(voc_root, tmp_path, monkeypatch):
    interrupted_at(monkeypatch, stage1_train, 2)
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 4,
                        "--out", tmp_path / "run", check=False)
    assert result.stderr.strip() == ("interrupted: no checkpoint yet (one every --save-every 500 steps): the same "
                                     "command starts the run again")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- outputs never collide

def test_predictions_of_images_whose_names_collide_each_get_files_of_their_own(pseudo_masks, tmp_path):
    images = tmp_path / "photos"
    (images / "x.png").mkdir(parents=True)
    for name, value in [("a.jpg", 10), ("a.png", 80), ("a.jpg.png", 160), ("x.jpg", 200), ("x.png/y.jpg", 250)]:
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(images / name)
    result = run_script("evaluate.py", "--checkpoint", pseudo_masks / "s1", "--images", images, "--save-dir",
                        tmp_path / "pred", "--workers", 0)
    assert "predicted 5 of 5 images" in result.stdout
    written = sorted(str(p.relative_to(tmp_path / "pred")) for p in (tmp_path / "pred").rglob("*.png") if p.is_file())
    assert written == ["a.jpg.png", "a.jpg.png.png", "a.png.png", "x.jpg.png", "x.png/y.png"]  # five images, five
    assert len(list((tmp_path / "pred").rglob("*_overlay.jpg"))) == 5


def test_stage2s_own_files_never_collide_with_the_masks_of_images_named_like_them(tmp_path):
    root = tmp_path / "data"
    write_own_data(str(root))
    for name in ["preview", "stats", "confidence/img01", "masks/img02"]:
        os.makedirs(os.path.dirname(root / "images" / name), exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 99, np.uint8)).save(root / "images" / f"{name}.jpg")
    run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0,
               "--save-confidence")
    p1 = tmp_path / "p1"
    assert Image.open(p1 / "preview.png").mode == "RGB" and Image.open(p1 / "masks" / "preview.png").mode == "P"
    assert Image.open(p1 / "masks" / "confidence" / "img01.png").mode == "P"  # its pseudo-mask
    assert Image.open(p1 / "confidence" / "confidence" / "img01.png").mode == "L"  # its confidence
    assert Image.open(p1 / "masks" / "masks" / "img02.png").mode == "P" and json.load(open(p1 / "stats.json"))
    run_script("stage3_multitask.py", "--pseudo", p1, *TINY_MULTITASK, "--crop-size", 16, "--iters", 2,
               "--out", tmp_path / "s2")


# ----------------------------------------------------------------------------- a full disk, a killed write

def limited(megabytes):
    """A subprocess's file size limit: writing past it fails as a full disk does (EFBIG instead of ENOSPC)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (megabytes << 20, megabytes << 20))
    return apply


def test_a_full_disk_ends_in_one_line_leaves_nothing_half_written_and_a_rerun_continues(voc_root, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "stage1_train.py"), "--data-root", voc_root, "--labeled", 4,
               *TINY_TRAIN, "--out", tmp_path / "run"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            preexec_fn=limited(1))  # the tiny model's checkpoint is a few MB
    assert_user_error(result, f"cannot write {tmp_path / 'run' / 'checkpoint.pt'}: File too large; free space on its "
                              "disk, then run the same command again")
    assert sorted(os.listdir(tmp_path / "run")) == ["history.jsonl", "labeled.txt", "labeled_rounds.csv", "run.json",
                                                    "unlabeled.txt", "val.txt"]  # no half checkpoint, no .tmp, no lock
    run_script("stage1_train.py", *command[2:])
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_full_disk_while_writing_pseudo_masks_is_one_line_and_a_rerun_finishes(pseudo_masks, tmp_path, monkeypatch):
    save, calls = Image.Image.save, []

    def full_after_five(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, path, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", full_after_five)
    out = tmp_path / "p"
    result = run_script("stage2_pseudolabel.py", "--checkpoint", pseudo_masks / "s1", "--out", out, "--workers", 0,
                        check=False)
    assert_user_error(result, "cannot write", "No space left on device; free space on its disk")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "stats.json").exists()
    monkeypatch.undo()
    result = run_script("stage2_pseudolabel.py", "--checkpoint", pseudo_masks / "s1", "--out", out, "--workers", 0)
    assert "5 already done" in result.stdout and len(list((out / "masks").glob("*.png"))) == len(TRAIN_IDS)


def test_what_a_killed_write_left_is_removed_by_the_next_run(pseudo_masks, tmp_path):
    run = tmp_path / "s1"
    os.makedirs(run)
    for name in os.listdir(pseudo_masks / "s1"):
        (run / name).write_bytes((pseudo_masks / "s1" / name).read_bytes())
    os.remove(run / "metrics.json")  # a run stopped after its last checkpoint
    (run / "checkpoint.pt.tmp4194999").write_bytes(b"half a checkpoint")
    data_root = json.load(open(run / "run.json"))["args"]["data_root"]
    run_script("stage1_train.py", "--data-root", data_root, "--labeled", 4, *TINY_TRAIN, "--out", run)
    assert not (run / "checkpoint.pt.tmp4194999").exists() and (run / "metrics.json").exists()
    summary = tmp_path / "summary.json"
    (tmp_path / "summary.json.tmp4194999").write_text("{")
    run_script("evaluate.py", "--checkpoint", run, "--workers", 0, "--json", summary)
    assert not (tmp_path / "summary.json.tmp4194999").exists() and json.load(open(summary))["written_by"]


# ----------------------------------------------------------------------------- inputs checked at the start

@pytest.mark.parametrize("script,flags,fragment", [
    ("stage1_train.py", ["--iters", 0], "--iters 0: it must be above 0"),
    ("stage1_train.py", ["--epochs", 0], "--epochs 0.0: it must be above 0"),
    ("stage1_train.py", ["--lr", "nan"], "--lr nan: NaN and infinity are not allowed"),
    ("stage1_train.py", ["--image-scale", "-0.5"], "--image-scale -0.5: it must be above 0"),
    ("stage1_train.py", ["--batch-size", 0], "--batch-size 0: it must be above 0"),
    ("stage1_train.py", ["--save-every", 0], "--save-every 0: it must be above 0"),
    ("stage1_train.py", ["--scale-range", 0, 1], "--scale-range 0.0: it must be above 0"),
    ("stage1_train.py", ["--warmup", -1], "--warmup -1: it must be 0 or more"),
    ("stage1_train.py", ["--labeled", -3], "--labeled -3: it must be above 0"),
    ("stage3_multitask.py", ["--batch-unlabeled", 0], "--batch-unlabeled 0: it must be above 0"),
    ("stage3_multitask.py", ["--w-con", "inf"], "--w-con inf: NaN and infinity are not allowed"),
    ("stage3_multitask.py", ["--ema-decay", 1], "--ema-decay must be below 1"),
    ("stage2_pseudolabel.py", ["--batch-size", 0], "--batch-size 0: it must be above 0"),
    ("evaluate.py", ["--scales", 1, 0], "--scales 0.0: it must be above 0"),
    ("evaluate.py", ["--stride", 0, 5, "--window", 8, 8], "--stride 0: it must be above 0"),
    ("make_demo_data.py", ["--val", 0], "--val 0: it must be above 0"),
])
def test_numbers_that_make_no_sense_are_refused_before_any_work(tmp_path, script, flags, fragment):
    required = {"stage1_train.py": ["--data-root", tmp_path / "none", "--labeled", 4],
                "stage3_multitask.py": ["--pseudo", tmp_path / "none"],
                "stage2_pseudolabel.py": ["--checkpoint", tmp_path / "none.pt"],
                "evaluate.py": ["--checkpoint", tmp_path / "none.pt"], "make_demo_data.py": []}[script]
    output = "--save-dir" if script == "evaluate.py" else "--out"
    result = run_script(script, *required, *flags, output, tmp_path / "out", check=False)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_model_in_the_folder_is_named_on_resume(voc_root, tmp_path):
    command = ["stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 4, "--save-every", 2]
    run_script(*command, "--out", tmp_path / "run")
    os.remove(tmp_path / "run" / "metrics.json")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["backbone"], checkpoint["model"] = "resnet50", {"conv1.weight": torch.zeros(1)}
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    result = run_script(*command, "--out", tmp_path / "run", check=False)
    assert_user_error(result, "checkpoint.pt holds a resnet50 model of 21 classes", "not the run's checkpoint")
    result = run_script("stage1_train.py", "--resume", "--out", tmp_path / "run", check=False)
    assert_user_error(result, "checkpoint.pt holds a resnet50 model of 21 classes")


def test_a_bad_val_mask_is_found_before_training(voc_root, tmp_path):
    mask = np.array(Image.open(os.path.join(voc_root, "SegmentationClass", f"{VAL_IDS[2]}.png")))
    mask[0, 0] = 77
    Image.fromarray(mask, mode="L").save(os.path.join(voc_root, "SegmentationClass", f"{VAL_IDS[2]}.png"))
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out",
                        tmp_path / "run", check=False)
    assert_user_error(result, f"{VAL_IDS[2]}.png has the value 77, neither a class (0-20) nor 255")
    assert "step 1/" not in result.stdout and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_byte_order_marks_are_dropped_from_every_list(own_root_with_bom, tmp_path):
    root, listed = own_root_with_bom
    result = run_script("stage1_train.py", "--data-root", root, "--labeled-list", listed, *TINY_TRAIN,
                        "--out", tmp_path / "run")
    assert common.describe_dataset(root).class_names == ["background", "cat", "dog"]
    assert "this run: 2 labelled" in result.stdout


@pytest.fixture
def own_root_with_bom(tmp_path):
    root = str(tmp_path / "data")
    write_own_data(root, classes_txt="\ufeffbackground\ncat\ndog\n")
    listed = tmp_path / "labelled.txt"
    first, second = sorted(common.describe_dataset(root).pool)[:2]
    listed.write_text(f"\ufeff{first}\r\n{second}\r\n", encoding="utf-8")
    return root, listed


def test_float_tiffs_are_read_as_a_viewer_shows_them(tmp_path):
    ramp = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    Image.fromarray(ramp, mode="F").save(tmp_path / "ramp.tif")
    image = common.read_image(tmp_path / "ramp.tif")
    assert image.shape == (3, 20, 30) and image.max() == 255
    assert image[0, 10, 15] == int(255 * ramp[10, 15].astype(np.float64)) > 100  # not black
