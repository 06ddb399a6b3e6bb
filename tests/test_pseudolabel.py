"""stage2_pseudolabel.py: the written masks, their figures, resuming, and refusing to mix checkpoints."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import stage2_pseudolabel
from conftest import TINY_TRAIN, TRAIN_IDS, assert_user_error, image_size, run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory, voc_template):
    """A stage-1 checkpoint trained long enough that its predictions are not all one class."""
    out = str(tmp_path_factory.mktemp("pseudo") / "stage1")
    run_script("stage1_train.py", "--data-root", voc_template, "--labeled", 4, *TINY_TRAIN, "--iters", 30,
               "--optimizer", "adamw", "--lr", 0.01, "--head-lr-mult", 1, "--out", out)
    return voc_template, os.path.join(out, "checkpoint.pt")


def pseudolabel(checkpoint, out, *flags, check=True):
    return run_script("stage2_pseudolabel.py", "--checkpoint", checkpoint, "--out", out, "--workers", 0, "--device", "cpu",
                      *flags, check=check)


def test_writes_a_palette_png_of_class_indices_per_training_image(trained, tmp_path):
    voc_root, checkpoint = trained
    out = str(tmp_path / "pseudo")
    pseudolabel(checkpoint, out, "--save-confidence")
    preview = Image.open(os.path.join(out, "preview.png"))
    unlabeled = len(common.load_checkpoint(checkpoint)["unlabeled"])
    # A row per chosen unlabelled image, four 160-pixel columns (image, truth, pseudo-mask, confidence).
    assert preview.size == (4 * 162 + 2, 16 + min(8, unlabeled) * 162 + 2)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted([f"{i}.png" for i in TRAIN_IDS] + ["preview.png"])
    model = common.model_from_checkpoint(common.load_checkpoint(checkpoint), checkpoint).eval()
    for index, image_id in enumerate(TRAIN_IDS):
        png = Image.open(os.path.join(out, f"{image_id}.png"))
        assert png.mode == "P" and png.size == image_size(index) and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        image = common.normalize(common.read_image(common.describe_dataset(voc_root).images[image_id]))[None]
        with torch.no_grad():
            expected = model(image).argmax(1)[0].numpy()
        assert np.array_equal(np.array(png), expected)  # the argmax of the main head, full image
        confidence = Image.open(os.path.join(out, "confidence", f"{image_id}.png"))
        assert confidence.mode == "L" and confidence.size == png.size
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["images"] == len(TRAIN_IDS) and stats["labeled"]["images"] == 4 and stats["unlabeled"]["images"] == 8
    assert stats["source"]["sha256"] == common.file_sha256(checkpoint)


def test_quality_figures_match_the_written_masks(trained, tmp_path):
    voc_root, checkpoint = trained
    out = str(tmp_path / "pseudo")
    pseudolabel(checkpoint, out)
    stats = json.load(open(os.path.join(out, "stats.json")))
    saved = common.load_checkpoint(checkpoint)
    for group in ["labeled", "unlabeled"]:
        confusion = common.ConfusionMatrix(21)
        for image_id in saved[group]:
            truth = np.array(Image.open(common.describe_dataset(voc_root).masks[image_id]))
            confusion.update(torch.from_numpy(truth), torch.from_numpy(np.array(Image.open(os.path.join(out, f"{image_id}.png")))))
        assert stats[group]["miou"] == pytest.approx(confusion.miou())


def test_image_stats_by_hand():
    # Two pixels, two classes. Pixel 0: p = (0.85, 0.15), truth 0; pixel 1: p = (0.35, 0.65), truth 255.
    probs = torch.tensor([[0.85, 0.35], [0.15, 0.65]]).reshape(2, 1, 2)
    target = torch.tensor([[0, 255]])
    prediction, max_prob, row = stage2_pseudolabel.image_stats(probs, target, 2)
    assert prediction.tolist() == [[0, 1]] and max_prob.flatten().tolist() == pytest.approx([0.85, 0.65])
    assert row[:4].tolist() == [1, 0, 0, 0]  # confusion: one pixel, truth 0 predicted 0; the 255 pixel left out
    entropy = -(0.85 * math.log(0.85) + 0.15 * math.log(0.15)) - (0.35 * math.log(0.35) + 0.65 * math.log(0.65))
    pixels, sum_max, sum_entropy, confident, has_truth = row[4:9]
    assert (pixels, confident, has_truth) == (2, 0, 1)
    assert sum_max == pytest.approx(1.5) and sum_entropy == pytest.approx(entropy)
    histogram, with_truth, correct, truth_prob = row[9:].reshape(4, 10)
    assert histogram[6] == 1 and histogram[8] == 1 and histogram.sum() == 2  # [0.6, 0.7) and [0.8, 0.9)
    assert with_truth.tolist() == [0] * 8 + [1, 0] and correct.tolist() == [0] * 8 + [1, 0]  # only pixel 0 has truth
    assert truth_prob[8] == pytest.approx(0.85) and truth_prob.sum() == pytest.approx(0.85)


def test_an_ignore_region_is_255_in_the_mask_and_out_of_the_figures():
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).reshape(2, 1, 2)
    prediction, _, row = stage2_pseudolabel.image_stats(probs, torch.tensor([[0, 1]]), 2, torch.tensor([[False, True]]))
    assert prediction.tolist() == [[0, 255]]
    assert row[:4].tolist() == [1, 0, 0, 0]  # the region's pixel is not compared with the truth


def test_reliability_and_calibration_error_from_the_rows(tmp_path):
    """stats.json's reliability table and ECE, from two images' rows."""
    os.makedirs(tmp_path / "image_stats")
    probs = torch.tensor([[0.95, 0.95, 0.55, 0.55], [0.05, 0.05, 0.45, 0.45]]).reshape(2, 1, 4)
    target = torch.tensor([[0, 1, 0, 0]])  # bin 0.9-1.0: 1 of 2 right; bin 0.5-0.6: 2 of 2 right
    _, _, row = stage2_pseudolabel.image_stats(probs, target, 2)
    for image_id in ["a", "b"]:
        np.save(tmp_path / "image_stats" / f"{image_id}.npy", row)
    stats = stage2_pseudolabel.summarize(str(tmp_path), [], ["a", "b"], ["x", "y"])["unlabeled"]
    bins = {round(b["bin"][0], 1): b for b in stats["reliability"]}
    assert bins[0.9]["accuracy"] == pytest.approx(0.5) and bins[0.9]["mean_max_prob"] == pytest.approx(0.95)
    assert bins[0.5]["accuracy"] == pytest.approx(1.0) and bins[0.5]["share_of_pixels"] == pytest.approx(0.5)
    assert bins[0.1]["accuracy"] is None
    assert stats["calibration_error"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_same_output_whatever_the_batch_size(trained, tmp_path):
    _, checkpoint = trained
    pseudolabel(checkpoint, str(tmp_path / "one"), "--batch-size", 1)
    pseudolabel(checkpoint, str(tmp_path / "four"), "--batch-size", 4)
    for image_id in TRAIN_IDS:
        a = np.array(Image.open(tmp_path / "one" / f"{image_id}.png"))
        b = np.array(Image.open(tmp_path / "four" / f"{image_id}.png"))
        assert np.array_equal(a, b)


def test_rerun_skips_finished_images_and_completes_an_interrupted_run(trained, tmp_path):
    _, checkpoint = trained
    out = tmp_path / "pseudo"
    pseudolabel(checkpoint, str(out))
    first = json.load(open(out / "stats.json"))
    # As an interruption leaves it: two images missing, one with its figures but not its PNG, a temp file.
    os.remove(out / f"{TRAIN_IDS[0]}.png")
    os.remove(out / f"{TRAIN_IDS[1]}.png")
    os.remove(out / "image_stats" / f"{TRAIN_IDS[1]}.npy")
    (out / f"{TRAIN_IDS[2]}.png.tmp123").write_bytes(b"half")
    kept = os.path.getmtime(out / f"{TRAIN_IDS[5]}.png")
    result = pseudolabel(checkpoint, str(out))
    assert f"{len(TRAIN_IDS) - 2} already done" in result.stdout and "wrote 2 pseudo-masks" in result.stdout
    assert os.path.getmtime(out / f"{TRAIN_IDS[5]}.png") == kept
    second = json.load(open(out / "stats.json"))
    for group in ["labeled", "unlabeled"]:
        assert second[group]["miou"] == pytest.approx(first[group]["miou"])
        assert second[group]["mean_entropy"] == pytest.approx(first[group]["mean_entropy"])


def test_refuses_to_mix_two_checkpoints_unless_overwrite(trained, tmp_path):
    voc_root, checkpoint = trained
    out = str(tmp_path / "pseudo")
    pseudolabel(checkpoint, out)
    other = str(tmp_path / "other")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--seed", 5, "--out", other)
    other_checkpoint = os.path.join(other, "checkpoint.pt")
    result = pseudolabel(other_checkpoint, out, check=False)
    assert_user_error(result, "already holds pseudo-masks from", "--overwrite")
    result = pseudolabel(other_checkpoint, out, "--overwrite")
    assert "0 already done" in result.stdout
    assert json.load(open(os.path.join(out, "source.json")))["sha256"] == common.file_sha256(other_checkpoint)


def test_bad_inputs(trained, tmp_path):
    voc_root, checkpoint = trained
    assert_user_error(pseudolabel(str(tmp_path / "missing.pt"), str(tmp_path / "p"), check=False), "not found")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert_user_error(pseudolabel(str(foreign), str(tmp_path / "p"), check=False), "not a checkpoint of this project")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(pseudolabel(checkpoint, str(a_file), check=False), "is a file")
    broken = tmp_path / "VOC2012"
    shutil.copytree(voc_root, broken)
    (broken / "JPEGImages" / f"{TRAIN_IDS[3]}.jpg").write_bytes(b"garbage")
    result = pseudolabel(checkpoint, str(tmp_path / "p2"), "--data-root", str(broken), check=False)
    assert_user_error(result, "cannot read image", TRAIN_IDS[3])
