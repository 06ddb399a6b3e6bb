"""stage1_train.py and evaluate.py run as a user runs them: outputs, continuing a run, refusing
another recipe or a folder they did not write, every bad input in one line, predictions on a
folder of one's own images."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import outputs
from conftest import TINY_TRAIN, TRAIN_IDS, VAL_IDS, assert_user_error, image_size, run_script


@pytest.fixture
def stage1_run(voc_root, tmp_path):
    out = str(tmp_path / "stage1")
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", out)
    return voc_root, out, result


def test_stage1_writes_checkpoint_split_and_metrics(stage1_run):
    voc_root, out, result = stage1_run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "history.jsonl", "labeled.txt", "labeled_rounds.csv",
                                       "metrics.json", "run.json", "unlabeled.txt", "val.txt"]
    assert "step 2/2  loss" in result.stdout and "it/s  eta" in result.stdout and "mIoU" in result.stdout
    labeled = open(os.path.join(out, "labeled.txt")).read().split()
    unlabeled = open(os.path.join(out, "unlabeled.txt")).read().split()
    assert len(labeled) == 4 and sorted(labeled + unlabeled) == TRAIN_IDS
    assert open(os.path.join(out, "val.txt")).read().split() == VAL_IDS
    checkpoint, _ = outputs.load_checkpoint(out)
    assert checkpoint["step"] == 2 and checkpoint["labeled"] == labeled and checkpoint["unlabeled"] == unlabeled
    assert checkpoint["args"]["backbone"] == "tiny_unet" and checkpoint["class_names"] == common.VOC_CLASSES
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics["per_class"]) == set(common.VOC_CLASSES) and 0 <= metrics["miou"] <= 100


def test_the_first_lines_say_what_the_data_holds(stage1_run):
    voc_root, out, result = stage1_run
    lines = result.stdout.splitlines()
    assert lines[0] == f"voc data in {voc_root}: 12 training images (12 with a mask, 0 without), 4 val images, 21 classes"
    assert lines[1] == "classes: PASCAL VOC's 21 (no classes.txt, class_names.txt or labelmap.txt)"
    assert lines[2] == "this run: 4 labelled and 8 unlabelled training images"
    assert lines[3].startswith("pixels of the 4 labelled masks: background ")
    shares = " ".join(lines[3:9])
    assert "ignored (255): " in shares and "pixels of the 4 val masks: background" in shares
    assert all(len(line) <= 120 for line in lines[3:9])  # 21 classes wrap into lines a person can read
    assert next(line for line in lines if line.startswith("note:")).startswith(
        "note: the labelled masks have no pixel of ")


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
    save_dir, json_path = str(tmp_path / "pred"), str(tmp_path / "val.json")
    result = run_script("evaluate.py", "--checkpoint", out, "--workers", 0, "--save-dir", save_dir, "--json", json_path)
    assert "aeroplane" in result.stdout and "mIoU" in result.stdout
    report = json.load(open(json_path))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert report["miou"] == pytest.approx(metrics["miou"])
    for name, iou in metrics["per_class"].items():
        assert report["per_class"][name] == (None if iou is None else pytest.approx(iou))
    assert sorted(os.listdir(save_dir)) == sorted([f"{i}.png" for i in VAL_IDS] + ["run.json"])
    for index, image_id in enumerate(VAL_IDS, start=len(TRAIN_IDS)):
        png = Image.open(os.path.join(save_dir, f"{image_id}.png"))
        assert png.mode == "P" and png.size == image_size(index)
        assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colours
    # The same command again writes them again; another checkpoint into the same folder is refused.
    run_script("evaluate.py", "--checkpoint", out, "--workers", 0, "--save-dir", save_dir, "--json", json_path)
    other = str(tmp_path / "other")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--seed", 3, "--out", other)
    assert_user_error(run_script("evaluate.py", "--checkpoint", other, "--workers", 0, "--save-dir", save_dir, check=False),
                      f"{save_dir} was made with --checkpoint sha256:", "use another --save-dir")


def test_evaluate_compares_checkpoints_on_the_same_val_set(stage1_run, tmp_path):
    voc_root, out, _ = stage1_run
    other = str(tmp_path / "other")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 3, "--out", other)
    json_path = str(tmp_path / "summary.json")
    result = run_script("evaluate.py", "--checkpoint", out, "--compare", other, "--workers", 0, "--json", json_path)
    report = json.load(open(json_path))
    theirs = json.load(open(os.path.join(other, "metrics.json")))["miou"]
    assert report["compare"]["other"]["miou"] == pytest.approx(theirs)
    assert report["compare"]["other"]["gain"] == pytest.approx(report["miou"] - theirs)
    assert f"{out}/checkpoint.pt is above it by" in result.stdout


def test_evaluate_batching_and_tta_options(stage1_run, tmp_path):
    _, out, _ = stage1_run
    reports = []
    for batch in [1, 3]:
        path = str(tmp_path / f"b{batch}.json")
        run_script("evaluate.py", "--checkpoint", out, "--workers", 0, "--batch-size", batch, "--json", path)
        reports.append({k: v for k, v in json.load(open(path)).items()})
    assert reports[0] == reports[1]
    path = str(tmp_path / "tta.json")
    run_script("evaluate.py", "--checkpoint", out, "--workers", 1, "--flip", "--scales", 0.75, 1, 1.25, "--json", path)
    assert 0 <= json.load(open(path))["miou"] <= 100


def stopped_at_step_2(out):
    """Make `out`'s finished 4-step run look like one stopped after its step-2 checkpoint."""
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    checkpoint["step"], checkpoint["scheduler"]["last_epoch"] = 2, 2
    torch.save(checkpoint, os.path.join(out, "checkpoint.pt"))
    os.remove(os.path.join(out, "metrics.json"))


@pytest.mark.parametrize("how", ["the same command", "--resume"])
def test_an_interrupted_run_continues_where_it_stopped(voc_root, tmp_path, how):
    out = str(tmp_path / "run")
    command = ["--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 4, "--save-every", 2, "--out", out]
    run_script("stage1_train.py", *command)
    stopped_at_step_2(out)
    again = command if how == "the same command" else ["--resume", "--out", out, "--workers", 0, "--device", "cpu",
                                                         "--print-every", 1]
    result = run_script("stage1_train.py", *again)
    assert f"continuing the run in {out} from step 2" in result.stdout
    assert "step 3/4" in result.stdout and "step 4/4" in result.stdout and "step 1/4" not in result.stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 4
    assert os.path.exists(os.path.join(out, "metrics.json"))
    assert "nothing to do" in run_script("stage1_train.py", *command).stdout  # finished: left alone


def test_interrupted_before_its_first_checkpoint_it_starts_again(voc_root, tmp_path):
    out = str(tmp_path / "run")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", out)
    os.remove(os.path.join(out, "checkpoint.pt"))
    os.remove(os.path.join(out, "metrics.json"))
    result = run_script("stage1_train.py", "--resume", "--out", out, "--workers", 0, "--device", "cpu", "--print-every", 1)
    assert "step 1/2" in result.stdout and os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_another_recipe_is_refused_and_nothing_is_overwritten(stage1_run):
    voc_root, out, _ = stage1_run
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 5, *TINY_TRAIN, "--out", out, check=False)
    assert_user_error(result, f"{out} was made with --labeled 4, this command asks for --labeled 5",
                      "use another --out, or the run's flags (or --resume) to continue it")
    result = run_script("stage1_train.py", "--resume", "--out", out, "--lr", 0.5, "--workers", 0, check=False)
    assert_user_error(result, "was made with --lr 0.001, this command asks for --lr 0.5")
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    result = run_script("stage1_train.py", "--resume", "--out", os.path.dirname(out) + "/nothing", check=False)
    assert_user_error(result, "--resume:", "holds no run of stage1_train.py")


@pytest.mark.parametrize("script", ["stage1_train.py", "evaluate.py"])
def test_an_unrelated_folder_is_refused_and_left_as_it_was(stage1_run, tmp_path, script):
    voc_root, out, _ = stage1_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labeled.txt").write_text("my own list\n")
    (mine / "metrics.json").write_text('{"mine": true}\n')
    if script == "stage1_train.py":
        result = run_script(script, "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", mine, check=False)
        assert_user_error(result, f"--out {mine} holds files that stage1_train.py did not write (labeled.txt")
    else:
        result = run_script(script, "--checkpoint", out, "--workers", 0, "--save-dir", mine, check=False)
        assert_user_error(result, f"--save-dir {mine} holds files that evaluate.py did not write")
        result = run_script(script, "--checkpoint", out, "--workers", 0, "--json", mine / "metrics.json", check=False)
        assert_user_error(result, "exists and was not written by evaluate.py")
    assert sorted(os.listdir(mine)) == ["labeled.txt", "metrics.json"]
    assert (mine / "labeled.txt").read_text() == "my own list\n" and (mine / "metrics.json").read_text() == '{"mine": true}\n'


def test_another_scripts_folder_is_refused(stage1_run, tmp_path):
    voc_root, out, _ = stage1_run
    pseudo = tmp_path / "pseudo1"
    run_script("stage2_pseudolabel.py", "--checkpoint", out, "--out", pseudo, "--workers", 0)
    before = sorted(os.listdir(pseudo))
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", pseudo, check=False)
    assert_user_error(result, f"--out {pseudo} holds no outputs of stage1_train.py")
    assert sorted(os.listdir(pseudo)) == before


@pytest.mark.parametrize("script", ["stage1_train.py", "evaluate.py"])
def test_nothing_is_ever_written_into_the_data(stage1_run, script):
    voc_root, out, _ = stage1_run
    inside = os.path.join(voc_root, "SegmentationClass", "runs")
    if script == "stage1_train.py":
        result = run_script(script, "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", inside, check=False)
    else:
        result = run_script(script, "--checkpoint", out, "--workers", 0, "--save-dir", inside, check=False)
    assert_user_error(result, f"{inside} is inside {voc_root}, which this command reads")
    assert not os.path.exists(inside)


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
                                           ("label value", "has the value 77")])
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
    (["--labeled", "9"], "the classic protocol draws from the 8 training images with a mask"),
    (["--labeled-list", "/nonexistent/list.txt"], "--labeled-list /nonexistent/list.txt not found"),
    (["--crop-size", "4", "--labeled", "4"], "--crop-size 4: one number or two (HEIGHT WIDTH), each at least 8"),
    (["--image-scale", "0.01", "--labeled", "4"], "too small for the model (at least 8 pixels a side); check --image-scale"),
    (["--labeled", "4", "--backbone", "resnet50", "--batch-size", "1"], "--batch-size 1: DeepLabv3's image pooling"),
])
def test_bad_flags(voc_root, tmp_path, flags, fragment):
    data_root = [] if "--data-root" in flags else ["--data-root", voc_root]
    result = run_script("stage1_train.py", *data_root, *TINY_TRAIN, *flags, "--out", str(tmp_path / "run"), check=False)
    assert_user_error(result, fragment)


def test_split_id_without_image(voc_root, tmp_path):
    os.remove(os.path.join(voc_root, "JPEGImages", f"{TRAIN_IDS[-1]}.jpg"))
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--out", str(tmp_path / "r"), check=False)
    assert_user_error(result, f"{TRAIN_IDS[-1]} has a mask or a line in ImageSets/ but no image in JPEGImages/")


def test_an_output_folder_that_cannot_be_written_is_one_line(voc_root, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN,
                        "--out", tmp_path / "file" / "run", check=False)
    assert_user_error(result, "--out", "cannot write there")

    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):  # as a read-only disk answers (root may write anywhere: simulated)
        if str(path).startswith(str(tmp_path / "readonly")):
            raise PermissionError(13, "Permission denied")
        return makedirs(path, *args, **kwargs)
    monkeypatch.setattr(common.os, "makedirs", read_only)
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN,
                        "--out", tmp_path / "readonly", check=False)
    assert_user_error(result, f"--out {tmp_path / 'readonly'}: cannot write there (Permission denied)")


def test_a_result_file_that_cannot_be_written_is_refused_before_the_val_pass(stage1_run, tmp_path):
    _, out, _ = stage1_run
    (tmp_path / "file").write_text("x")
    result = run_script("evaluate.py", "--checkpoint", out, "--workers", 0, "--json", tmp_path / "file" / "val.json", check=False)
    assert_user_error(result, "--json", "cannot be written")
    assert result.stdout == ""  # refused before evaluating anything


def test_evaluate_bad_inputs(stage1_run, tmp_path):
    voc_root, out, _ = stage1_run
    assert_user_error(run_script("evaluate.py", "--checkpoint", str(tmp_path / "none.pt"), check=False), "not found")
    assert_user_error(run_script("evaluate.py", "--checkpoint", str(tmp_path), check=False),
                      f"{tmp_path} not found (a folder without checkpoint.pt)")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(run_script("evaluate.py", "--checkpoint", junk, check=False), "is not a checkpoint of this project")
    with open(os.path.join(voc_root, "classes.txt"), "w") as f:
        f.write("background\nthing\n")
    assert_user_error(run_script("evaluate.py", "--checkpoint", out, check=False), "predicts 21 classes but", "has 2")
    os.remove(os.path.join(voc_root, "classes.txt"))
    # A checkpoint whose weights do not fit its own arguments.
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    checkpoint["args"]["backbone"] = "resnet50"
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    assert_user_error(run_script("evaluate.py", "--checkpoint", tmp_path / "mismatch.pt", check=False),
                      "do not fit a resnet50 model")


def test_history_has_every_progress_line_and_evaluation_and_a_continued_run_continues_it(voc_root, tmp_path):
    out = str(tmp_path / "run")
    command = ["--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--iters", 4, "--eval-every", 2, "--save-every", 2, "--out", out]
    run_script("stage1_train.py", *command)
    records = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_miou" in r] == [2, 4]
    assert all({"lr", "it_per_s", "time"} <= set(r) for r in records if "loss" in r)
    # Stopped after the step-2 checkpoint, with steps 3 and 4 already in the history: they are written once.
    stopped_at_step_2(out)
    run_script("stage1_train.py", *command)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "history.jsonl")) if "loss" in line]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "nan"], "--lr nan: NaN and infinity are not allowed"),
    (["--scale-range", "0.5", "inf"], "--scale-range inf: NaN and infinity are not allowed"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: it must be 0 or more"),
    (["--crop-size", "8", "8", "8"], "--crop-size 8 8 8: one number or two"),
])
def test_non_finite_and_negative_numbers_are_refused(voc_root, tmp_path, flags, fragment):
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, *flags,
                        "--out", tmp_path / "run", check=False)
    assert_user_error(result, fragment)
    assert not os.path.exists(tmp_path / "run")


def test_default_workers_fit_the_cores():
    assert 1 <= common.default_workers() <= max(1, min(8, len(os.sched_getaffinity(0))))
