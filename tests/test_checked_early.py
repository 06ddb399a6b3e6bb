"""Every check that can be made at the start is made there; nothing a command did not write is deleted; outputs
and inputs never nest; interrupts and JSON files say the truth."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import common
import outputs
from conftest import ROOT, TINY_TRAIN, assert_user_error, run_script
from test_layouts import SIZE, classes_of, image_of, own_layout, save
from test_real_usage import TINY_MULTITASK


def stage1(root, out, *flags, check=False):
    return run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, *flags, "--out", out,
                      check=check)


def refused_before_training(result, out, *fragments):
    assert_user_error(result, *fragments)
    assert not os.path.exists(os.path.join(out, "checkpoint.pt")) and not os.path.exists(out)  # nothing left


# ----------------------------------------------------------------------------- checked at the start

def test_more_classes_than_a_mask_holds_are_refused_before_training(tmp_path):
    root = own_layout(tmp_path / "data", "".join(f"class {i}\n" for i in range(300)))
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", "classes.txt line 300: 300 classes",
                            "255 at most")


def test_a_val_mask_of_the_wrong_size_is_found_at_the_start(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    (root / "val.txt").write_text("5\n")
    save(str(root / "masks" / "5.png"), classes_of(5)[:-4])
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", "5.png is 40x28 but its image is 40x32")


def test_two_layouts_in_one_folder_and_a_voc_folder_without_masks_are_refused(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    (root / "JPEGImages").mkdir()  # left over from another dataset
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", "holds both JPEGImages/ and images/",
                            "keep one of them there")
    (root / "images").rename(root / "images_old")  # now a VOC-style folder: images, but no mask in its folders
    for index in range(6):
        save(str(root / "JPEGImages" / f"{index}.jpg"), image_of(index))
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1",
                            f"{root} has 0 images with a mask; it needs two at least")


def test_a_mask_of_a_turned_photo_says_why_its_sides_are_swapped(tmp_path):
    from PIL import Image
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do: a viewer turns it 90 degrees, to 32 wide and 40 high
    Image.fromarray(image_of(0)).save(root / "images" / "0.jpg", exif=exif.tobytes())
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", "0.png is 40x32 but its image is 32x40 "
                            "(its sides swapped: an image with an EXIF orientation", "a mask must be the size of its image")
    save(str(root / "masks" / "0.png"), np.rot90(classes_of(0), -1))  # the mask drawn on the photo as shown
    assert stage1(root, tmp_path / "s1").returncode == 0


@pytest.mark.parametrize("name,damage", [("photo.jpg", "not an image"), ("photo.jpg", "truncated"),
                                         ("photo.png", "truncated")])
def test_an_unlabelled_image_that_cannot_be_read_is_named_by_stage1(tmp_path, name, damage):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    save(str(root / "images" / name), image_of(1))
    whole = (root / "images" / name).read_bytes()  # a header that reads, the rest cut off: found only by decoding
    (root / "images" / name).write_bytes(b"not an image" if damage == "not an image" else whole[:len(whole) * 3 // 4])
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", f"cannot read image {root / 'images' / name}",
                            "replace it, or move it out of the data")


def test_an_image_removed_after_stage1_is_named_so_by_stage2(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    save(str(root / "images" / "photo.jpg"), image_of(9))
    stage1(root, tmp_path / "s1", check=True)
    os.remove(root / "images" / "photo.jpg")
    result = run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1",
                        "--workers", 0, check=False)
    assert_user_error(result, "the image photo, which is no longer a training image", "put it back, or train again")


def test_image_names_too_long_for_their_files_are_refused_at_the_start(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    long_name = "x" * 245
    save(str(root / "images" / f"{long_name}.jpg"), image_of(7))
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", f"the image {long_name} has a name too "
                            "long for the files named after it", "rename it")


def test_predicting_a_folder_skips_an_image_whose_name_is_too_long_and_predicts_the_others(voc_root, tmp_path):
    stage1(voc_root, tmp_path / "s1", check=True)
    photos = tmp_path / "photos"
    save(str(photos / "a.jpg"), image_of(1))
    save(str(photos / ("y" * 240 + ".jpg")), image_of(2))
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "s1", "--images", photos, "--save-dir",
                        tmp_path / "pred", "--workers", 0, check=False)
    assert result.returncode != 0 and "skipped:" in result.stderr and "its name is too long" in result.stderr
    assert "1 of 2 images" in result.stderr and (tmp_path / "pred" / "a.png").exists()


def test_a_palette_that_contradicts_the_class_lists_colours_is_refused(tmp_path):
    palette = [0, 0, 0, 10, 10, 250, 250, 10, 10] + [0] * (768 - 9)  # cat drawn blue, dog red: swapped
    root = own_layout(tmp_path / "data", "background 0 0 0\ncat 250 10 10\ndog 10 10 250\n",
                      masks=lambda index: classes_of(index))
    for index in range(6):
        save(str(root / "masks" / f"{index}.png"), classes_of(index), palette)
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", "is a palette PNG whose value 1 is drawn "
                            "10 10 250, but the class list gives class 1 the colour 250 10 10")


@pytest.mark.parametrize("which,fragment", [("labelled", "learn"), ("val", "measure")])
def test_masks_that_are_all_ignore_are_refused_at_the_start(tmp_path, which, fragment):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    (root / "val.txt").write_text("5\n")
    for index in ([5] if which == "val" else range(5)):
        save(str(root / "masks" / f"{index}.png"), np.full(SIZE, 255, np.uint8))
    refused_before_training(stage1(root, tmp_path / "s1"), tmp_path / "s1", f"{which} masks is 255 (ignore)",
                            f"nothing to {fragment}")


def test_a_resumed_run_notices_an_edited_class_list(voc_root, tmp_path):
    (open(os.path.join(voc_root, "classes.txt"), "w")).write("".join(f"{c}\n" for c in common.VOC_CLASSES))
    stage1(voc_root, tmp_path / "s1", "--iters", 4, "--save-every", 2, check=True)
    os.remove(tmp_path / "s1" / "metrics.json")  # as if stopped after its last checkpoint
    names = list(common.VOC_CLASSES)
    names[7] = "automobile"
    (open(os.path.join(voc_root, "classes.txt"), "w")).write("".join(f"{c}\n" for c in names))
    assert_user_error(stage1(voc_root, tmp_path / "s1", "--iters", 4, "--save-every", 2),
                      "was trained with other classes", "'car' is now 'automobile'", "restore the class list")


def test_windows_files_in_masks_are_left_alone_as_in_images(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    for folder in ["images", "masks"]:
        (root / folder / "Thumbs.db").write_bytes(b"\x00")
        (root / folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    assert len(common.describe_dataset(str(root)).images) == 6


def test_a_demo_size_that_cannot_fit_in_memory_is_one_line(tmp_path):
    result = run_script("make_demo_data.py", "--out", tmp_path / "demo", "--size", 100000, check=False)
    assert_user_error(result, "--size", "at most 1024")
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- JSON, and the words of a refusal

def test_json_files_hold_null_never_nan(tmp_path):
    confusion = common.ConfusionMatrix(3)
    report = confusion.report(["a", "b", "c"])
    assert report["miou"] is None and "no pixel with a true label" in report["note"]
    outputs.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: 1 / 0) == {"a": None,
                                                                                            "b": [None, 1.5]}


def test_stats_of_unlabelled_images_without_a_mask_are_strict_json(tmp_path):
    root = own_layout(tmp_path / "data", "background\ncat\ndog\n")
    (root / "val.txt").write_text("5\n")
    for index in range(6, 9):
        save(str(root / "images" / f"{index}.jpg"), image_of(index))
    run_script("stage1_train.py", "--data-root", root, "--labeled", 5, *TINY_TRAIN, "--out", tmp_path / "s1")
    for line in open(tmp_path / "s1" / "history.jsonl"):
        json.loads(line, parse_constant=lambda c: 1 / 0)
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0)
    stats = json.loads((tmp_path / "p1" / "stats.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert stats["unlabeled"]["images_with_truth"] == 0 and stats["unlabeled"]["miou"] is None
    assert stats["unlabeled"]["note"] == "no pixel with a true label: no IoU to measure"


def test_a_diverged_run_says_what_to_do_truthfully(voc_root, tmp_path):
    result = stage1(voc_root, tmp_path / "s1", "--lr", 1e30, "--iters", 3)
    assert_user_error(result, "the training diverged; train again with a lower --lr, into another --out")


# ----------------------------------------------------------------------------- never delete what is not ours

def test_a_rerun_removes_only_its_own_temporary_files(voc_root, tmp_path):
    out = tmp_path / "s1"
    stage1(voc_root, out, "--iters", 4, "--save-every", 2, check=True)
    os.remove(out / "metrics.json")
    (out / "notes").mkdir()
    (out / "notes" / "draft.tmp1").write_text("a user's notes")
    (out / "nested").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "nested" / f"checkpoint.pt.tmp{live.pid}").write_bytes(b"another run writing")
        (out / "checkpoint.pt.tmp4194999").write_bytes(b"half a checkpoint of a killed write")
        (out / f"checkpoint.pt.tmp{live.pid}").write_bytes(b"a write whose process still runs")
        stage1(voc_root, out, "--iters", 4, "--save-every", 2, check=True)
        assert (out / "notes" / "draft.tmp1").exists() and (out / "nested" / f"checkpoint.pt.tmp{live.pid}").exists()
        assert not (out / "checkpoint.pt.tmp4194999").exists() and (out / f"checkpoint.pt.tmp{live.pid}").exists()
    finally:
        live.kill()


@pytest.mark.parametrize("command,fragment", [
    (lambda b: ["stage3_multitask.py", "--pseudo", b / "p1", *TINY_MULTITASK, "--init", b / "s1", "--out",
                b / "s1" / "m"], "is inside"),
    (lambda b: ["stage2_pseudolabel.py", "--checkpoint", b / "s1", "--out", b / "s1" / "p"], "is inside"),
    (lambda b: ["stage2_pseudolabel.py", "--checkpoint", b / "s1" / "checkpoint.pt", "--out", b / "s1" / "p"],
     "is inside"),
    (lambda b: ["stage2_pseudolabel.py", "--checkpoint", b / "s1", "--previous", b / "p1", "--out", b / "p1" / "p"],
     "is inside"),
    (lambda b: ["evaluate.py", "--checkpoint", b / "s1", "--save-dir", b / "s1" / "pred"], "is inside"),
    (lambda b: ["stage2_pseudolabel.py", "--checkpoint", b / "s1", "--out", b], "holds"),
])
def test_an_output_inside_an_input_or_holding_one_is_refused(pseudo_masks, command, fragment):
    before = sorted(str(p) for p in pseudo_masks.rglob("*"))
    assert_user_error(run_script(*command(pseudo_masks), "--workers", 0, check=False), fragment,
                      "which this command reads; choose a folder apart from its inputs")
    assert sorted(str(p) for p in pseudo_masks.rglob("*")) == before


def test_predictions_of_one_image_never_go_into_its_folder(pseudo_masks, tmp_path):
    photos = tmp_path / "photos"
    save(str(photos / "a.jpg"), image_of(1))
    result = run_script("evaluate.py", "--checkpoint", pseudo_masks / "s1", "--images", photos / "a.jpg", "--save-dir",
                        photos / "pred", check=False)
    assert_user_error(result, f"--save-dir {photos / 'pred'} is inside {photos}")
    assert os.listdir(photos) == ["a.jpg"]


# ----------------------------------------------------------------------------- interrupts

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_imports_run_is_one_line(signum):
    interrupted = 0
    for delay in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7):  # importing torch takes seconds; numpy's import (CI's failure) early
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "stage1_train.py"), "--help"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, f"{signal.Signals(signum).name} after {delay} s: {stderr}"
        if "usage:" not in stdout:  # the imports had not finished
            assert process.returncode != 0 and stderr.strip() == "interrupted while starting: nothing was done"
            interrupted += 1
    assert interrupted >= 3


def test_sigterm_is_handled_as_ctrl_c(voc_root, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "stage1_train.py"), "--data-root", voc_root, "--labeled", 4,
               *TINY_TRAIN, "--iters", 100000, "--save-every", 2, "--out", tmp_path / "s1"]
    process = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "s1" / "checkpoint.pt").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr
    assert stderr.strip().startswith("interrupted: the same command continues from step")
