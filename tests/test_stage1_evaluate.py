"""stage1_train.py and evaluate.py run as a user runs them, and every bad input of issue 2."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import TINY_TRAIN, TRAIN_IDS, VAL_IDS, assert_user_error, image_size, run_script


@pytest.fixture
def stage1_run(voc_root, tmp_path):
    out = str(tmp_path / "stage1")
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", out)
    return voc_root, out, result


def test_stage1_writes_checkpoint_split_and_metrics(stage1_run):
    voc_root, out, result = stage1_run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "history.jsonl", "labeled.txt", "metrics.json", "unlabeled.txt"]
    assert "step 2/2  loss" in result.stdout and "it/s  eta" in result.stdout and "mIoU" in result.stdout
    labeled = open(os.path.join(out, "labeled.txt")).read().split()
    unlabeled = open(os.path.join(out, "unlabeled.txt")).read().split()
    assert len(labeled) == 4 and sorted(labeled + unlabeled) == TRAIN_IDS
    checkpoint = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert checkpoint["step"] == 2 and checkpoint["labeled"] == labeled and checkpoint["unlabeled"] == unlabeled
    assert checkpoint["args"]["backbone"] == "tiny_unet" and checkpoint["class_names"] == common.VOC_CLASSES
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics["per_class"]) == set(common.VOC_CLASSES) and 0 <= metrics["miou"] <= 100


def test_same_split_seed_same_split_and_another_seed_another(voc_root, tmp_path):
    splits = []
    for seed, name in [(0, "a"), (0, "b"), (1, "c"), (2, "d"), (3, "e")]:
        out = str(tmp_path / name)
        run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 3, "--split-seed", seed, *TINY_TRAIN,
                   "--iters", 1, "--out", out)
        splits.append(open(os.path.join(out, "labeled.txt")).read())
    assert splits[0] == splits[1] and len(set(splits[1:])) > 1


def test_evaluate_reproduces_stage1_metrics_and_writes_outputs(stage1_run, tmp_path):
    voc_root, out, _ = stage1_run
    checkpoint = os.path.join(out, "checkpoint.pt")
    save_dir, json_path = str(tmp_path / "pred"), str(tmp_path / "val.json")
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--workers", 0, "--save-dir", save_dir, "--json", json_path)
    assert "aeroplane" in result.stdout and "mIoU" in result.stdout
    report = json.load(open(json_path))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert report["miou"] == pytest.approx(metrics["miou"])
    for name, iou in metrics["per_class"].items():
        assert report["per_class"][name] == (None if iou is None else pytest.approx(iou))
    assert sorted(os.listdir(save_dir)) == [f"{i}.png" for i in VAL_IDS]
    for index, image_id in enumerate(VAL_IDS, start=len(TRAIN_IDS)):
        png = Image.open(os.path.join(save_dir, f"{image_id}.png"))
        assert png.mode == "P" and png.size == image_size(index)
        assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colours


def test_evaluate_batching_and_tta_options(stage1_run, tmp_path):
    _, out, _ = stage1_run
    checkpoint = os.path.join(out, "checkpoint.pt")
    reports = []
    for batch in [1, 3]:
        path = str(tmp_path / f"b{batch}.json")
        run_script("evaluate.py", "--checkpoint", checkpoint, "--workers", 0, "--batch-size", batch, "--json", path)
        reports.append(json.load(open(path)))
    assert reports[0] == reports[1]
    path = str(tmp_path / "tta.json")
    run_script("evaluate.py", "--checkpoint", checkpoint, "--workers", 1, "--flip", "--scales", 0.75, 1, 1.25, "--json", path)
    assert 0 <= json.load(open(path))["miou"] <= 100


def test_resume_continues_an_interrupted_run(stage1_run):
    voc_root, out, _ = stage1_run
    path = os.path.join(out, "checkpoint.pt")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", out + "4",
               "--iters", 4, "--save-every", 2)
    checkpoint = torch.load(os.path.join(out + "4", "checkpoint.pt"), weights_only=True)
    checkpoint["step"] = 2  # as left by a run stopped after its step-2 save
    checkpoint["scheduler"]["last_epoch"] = 2
    torch.save(checkpoint, path)
    os.remove(os.path.join(out, "metrics.json"))
    result = run_script("stage1_train.py", "--resume", "--out", out, "--workers", 0, "--device", "cpu", "--print-every", 1)
    assert f"resuming {path} at step 2" in result.stdout
    assert "step 3/4" in result.stdout and "step 4/4" in result.stdout and "step 1/4" not in result.stdout
    assert torch.load(path, weights_only=True)["step"] == 4 and os.path.exists(os.path.join(out, "metrics.json"))


def test_a_second_run_never_overwrites_the_first(stage1_run):
    voc_root, out, _ = stage1_run
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", out, check=False)
    assert_user_error(result, "exists", "--resume")
    result = run_script("stage1_train.py", "--resume", "--out", out, "--lr", 0.5, "--workers", 0, check=False)
    assert_user_error(result, "--lr 0.5 differs from the run being resumed")
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


def break_tree(voc_root, what):
    """Damage the tiny tree the way a user's data might be damaged."""
    if what == "unreadable image":
        open(os.path.join(voc_root, "JPEGImages", f"{VAL_IDS[0]}.jpg"), "wb").write(b"\x00garbage")
    elif what == "mask size":
        Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(os.path.join(voc_root, "SegmentationClass", f"{VAL_IDS[0]}.png"))
    elif what == "label value":
        mask = np.zeros(image_size(len(TRAIN_IDS))[::-1], np.uint8)
        mask[0, 0] = 77
        Image.fromarray(mask, mode="L").save(os.path.join(voc_root, "SegmentationClass", f"{VAL_IDS[0]}.png"))


@pytest.mark.parametrize("what,fragment", [("unreadable image", "cannot read image"), ("mask size", "5x5 but its image"),
                                           ("label value", "has label 77")])
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_are_named_in_one_line_also_from_worker_processes(voc_root, tmp_path, what, fragment, workers):
    break_tree(voc_root, what)
    out = str(tmp_path / "run")
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--workers", workers,
                        "--out", out, check=False, subprocess_run=True)  # the real process's stderr and exit status
    assert_user_error(result, fragment, VAL_IDS[0])


@pytest.mark.parametrize("flags,fragment", [
    (["--data-root", "/nonexistent/VOC2012", "--labeled", "4"], "--data-root /nonexistent/VOC2012 is not a folder"),
    (["--labeled", "0"], "--labeled 0"),
    (["--labeled", "-2"], "--labeled -2"),
    (["--labeled", "9"], "the classic protocol draws from 8 images"),
    (["--labeled-list", "/nonexistent/list.txt"], "--labeled-list /nonexistent/list.txt not found"),
    (["--crop-size", "0", "--labeled", "4"], "--crop-size must be at least 1"),
])
def test_bad_flags(voc_root, tmp_path, flags, fragment):
    data_root = [] if "--data-root" in flags else ["--data-root", voc_root]
    result = run_script("stage1_train.py", *data_root, *TINY_TRAIN, *flags, "--out", str(tmp_path / "run"), check=False)
    assert_user_error(result, fragment)


def test_split_id_without_image(voc_root, tmp_path):
    os.remove(os.path.join(voc_root, "JPEGImages", f"{TRAIN_IDS[-1]}.jpg"))
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", str(tmp_path / "r"), check=False)
    assert_user_error(result, f"split id {TRAIN_IDS[-1]} has no image")


def test_evaluate_bad_inputs(stage1_run, tmp_path):
    voc_root, out, _ = stage1_run
    assert_user_error(run_script("evaluate.py", "--checkpoint", str(tmp_path / "none.pt"), check=False), "not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(run_script("evaluate.py", "--checkpoint", junk, check=False), "is not a checkpoint of this project")
    with open(os.path.join(voc_root, "classes.txt"), "w") as f:
        f.write("background\nthing\n")
    assert_user_error(run_script("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), check=False),
                      "predicts 21 classes but", "has 2")
    os.remove(os.path.join(voc_root, "classes.txt"))
    # A checkpoint whose weights do not fit its own arguments.
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    checkpoint["args"]["backbone"] = "mobilenet_v3_large"
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    assert_user_error(run_script("evaluate.py", "--checkpoint", tmp_path / "mismatch.pt", check=False),
                      "do not fit a mobilenet_v3_large model")


def test_history_has_every_progress_line_and_evaluation_and_resume_continues_it(voc_root, tmp_path):
    out = str(tmp_path / "run")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 4,
               "--eval-every", 2, "--save-every", 2, "--out", out)
    records = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_miou" in r] == [2, 4]
    assert all({"lr", "it_per_s", "time"} <= set(r) for r in records if "loss" in r)
    # Stopped after the step-2 checkpoint, with steps 3 and 4 already in the history: resuming rewrites them once.
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    checkpoint["step"], checkpoint["scheduler"]["last_epoch"] = 2, 2
    torch.save(checkpoint, os.path.join(out, "checkpoint.pt"))
    run_script("stage1_train.py", "--resume", "--out", out, "--workers", 0, "--device", "cpu", "--print-every", 1)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "history.jsonl")) if "loss" in line]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "nan"], "--lr nan: NaN and infinity are not allowed"),
    (["--scale-range", "0.5", "inf"], "--scale-range [0.5, inf]: NaN and infinity are not allowed"),
    (["--weight-decay", "-1"], "cannot be negative"),
    (["--crop-size", "8", "8", "8"], "--crop-size takes one number or two"),
])
def test_non_finite_and_negative_numbers_are_refused(voc_root, tmp_path, flags, fragment):
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, *flags,
                        "--out", tmp_path / "run", check=False)
    assert_user_error(result, fragment)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_an_output_folder_that_cannot_be_made_is_one_line(voc_root, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN,
                        "--out", tmp_path / "file" / "run", check=False)
    assert_user_error(result, "--out", "cannot be created")


def test_default_workers_fit_the_cores():
    assert 1 <= common.default_workers() <= max(1, min(8, len(os.sched_getaffinity(0))))


def test_predictions_on_a_folder_of_images(stage1_run, tmp_path):
    _, out, _ = stage1_run
    images = tmp_path / "photos"
    (images / "holiday").mkdir(parents=True)
    Image.fromarray(np.zeros((21, 34, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.full((17, 23, 3), 200, np.uint8)).save(images / "holiday" / "b.PNG")
    (images / "notes.txt").write_text("not an image")
    save = tmp_path / "pred"
    result = run_script("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--images", images,
                        "--save-dir", save, "--flip", "--scales", 0.75, 1)
    assert "predicted 2 of 2 images" in result.stdout
    assert Image.open(save / "a.png").size == (34, 21) and Image.open(save / "a.png").mode == "P"
    assert Image.open(save / "holiday" / "b.png").size == (23, 17)
    assert Image.open(save / "holiday" / "b_overlay.jpg").size == (23, 17)
    # An unreadable image among them: named, the others still written, a non-zero exit at the end.
    (images / "broken.jpg").write_bytes(b"garbage")
    os.remove(save / "a.png")
    result = run_script("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--images", images,
                        "--save-dir", save, check=False)
    assert result.returncode != 0 and "broken.jpg" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: 1 of 3 images under {images} could not be read (named above)"
    assert os.path.exists(save / "a.png")


def test_predictions_bad_inputs(stage1_run, tmp_path):
    _, out, _ = stage1_run
    checkpoint = os.path.join(out, "checkpoint.pt")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_script("evaluate.py", "--checkpoint", checkpoint, "--images", tmp_path / "empty", "--save-dir",
                                 tmp_path / "p", check=False), "holds no .jpg, .jpeg or .png image")
    assert_user_error(run_script("evaluate.py", "--checkpoint", checkpoint, "--images", tmp_path / "empty", check=False),
                      "--images needs --save-dir")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(run_script("evaluate.py", "--checkpoint", junk, "--images", tmp_path / "empty", "--save-dir",
                                 tmp_path / "p", check=False), "is not a checkpoint of this project")
