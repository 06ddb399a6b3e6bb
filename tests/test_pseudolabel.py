"""stage2_pseudolabel.py: the written masks, their figures, resuming, earlier rounds, and never
mixing two checkpoints' masks or touching files it did not write."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import outputs
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
    saved, _ = outputs.load_checkpoint(checkpoint)
    # A row per chosen unlabelled image, four 160-pixel columns (image, truth, pseudo-mask, confidence), a legend.
    rows = min(8, len(saved["unlabeled"]))
    assert preview.size[0] == 4 * 164 + 4 and 18 + rows * 178 + 24 <= preview.size[1] <= 18 + rows * 178 + 6 + 18 * 4
    assert sorted(os.listdir(out)) == ["confidence", "image_stats", "label_next.csv", "label_next.png",
                                       "labeled.txt", "labeled_rounds.csv", "masks", "preview.png", "run.json",
                                       "stats.json", "unlabeled.txt", "val.txt"]
    assert sorted(os.listdir(os.path.join(out, "masks"))) == sorted(f"{i}.png" for i in TRAIN_IDS)
    model = common.model_from_checkpoint(saved, checkpoint).eval()
    for index, image_id in enumerate(TRAIN_IDS):
        png = Image.open(os.path.join(out, "masks", f"{image_id}.png"))
        assert png.mode == "P" and png.size == image_size(index) and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        image = common.read_image(common.describe_dataset(voc_root).images[image_id])[None]
        with torch.no_grad():
            expected = model(common.images_to_device(image, torch.device("cpu"))).argmax(1)[0].numpy()
        assert np.array_equal(np.array(png), expected)  # the argmax of the main head, full image
        confidence = Image.open(os.path.join(out, "confidence", f"{image_id}.png"))
        assert confidence.mode == "L" and confidence.size == png.size
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["images"] == len(TRAIN_IDS) and stats["labeled"]["images"] == 4 and stats["unlabeled"]["images"] == 8
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["recipe"]["checkpoint"] == "sha256:" + outputs.file_sha256(checkpoint)[:16]
    assert common.read_lines(os.path.join(out, "labeled.txt")) == saved["labeled"]  # the split stage 3 trains with


def test_quality_figures_match_the_written_masks(trained, tmp_path):
    voc_root, checkpoint = trained
    out = str(tmp_path / "pseudo")
    pseudolabel(checkpoint, out)
    stats = json.load(open(os.path.join(out, "stats.json")))
    saved, _ = outputs.load_checkpoint(checkpoint)
    for group in ["labeled", "unlabeled"]:
        confusion = common.ConfusionMatrix(21)
        for image_id in saved[group]:
            truth = np.array(Image.open(common.describe_dataset(voc_root).masks[image_id]))
            confusion.update(torch.from_numpy(truth), torch.from_numpy(np.array(Image.open(os.path.join(out, "masks", f"{image_id}.png")))))
        assert stats[group]["miou"] == pytest.approx(confusion.miou())


def test_batch_stats_by_hand():
    # Two pixels, two classes. Pixel 0: p = (0.85, 0.15), truth 0; pixel 1: p = (0.35, 0.65), truth 255.
    probs = torch.tensor([[0.85, 0.35], [0.15, 0.65]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    prediction, max_prob, rows = stage2_pseudolabel.batch_stats(probs, target, 2)
    row = rows[0].numpy()
    assert prediction.tolist() == [[[0, 1]]] and max_prob.flatten().tolist() == pytest.approx([0.85, 0.65])
    assert row[:4].tolist() == [1, 0, 0, 0]  # confusion: one pixel, truth 0 predicted 0; the 255 pixel left out
    entropy = -(0.85 * math.log(0.85) + 0.15 * math.log(0.15)) - (0.35 * math.log(0.35) + 0.65 * math.log(0.65))
    pixels, sum_max, sum_entropy, sum_margin, confident, has_truth = row[4:10]
    assert (pixels, confident, has_truth) == (2, 0, 1)
    assert sum_max == pytest.approx(1.5) and sum_entropy == pytest.approx(entropy)
    assert sum_margin == pytest.approx((0.85 - 0.15) + (0.65 - 0.35))  # p1 - p2, summed
    histogram, with_truth, correct, truth_prob = row[10:].reshape(4, 10)
    assert histogram[6] == 1 and histogram[8] == 1 and histogram.sum() == 2  # [0.6, 0.7) and [0.8, 0.9)
    assert with_truth.tolist() == [0] * 8 + [1, 0] and correct.tolist() == [0] * 8 + [1, 0]  # only pixel 0 has truth
    assert truth_prob[8] == pytest.approx(0.85) and truth_prob.sum() == pytest.approx(0.85)


def test_batch_stats_of_a_batch_are_those_of_its_images():
    """The rows are computed for a whole batch at once on the device: each must be its image's own."""
    torch.manual_seed(0)
    probs = torch.rand(5, 4, 6, 7).softmax(1)
    targets = torch.randint(0, 4, (5, 6, 7))
    targets[1, :2] = 255
    region = torch.zeros(6, 7, dtype=torch.bool)
    region[-1] = True
    prediction, max_prob, rows = stage2_pseudolabel.batch_stats(probs, targets, 4, region)
    for i in range(5):
        p, m, row = stage2_pseudolabel.batch_stats(probs[i:i + 1], targets[i:i + 1], 4, region)
        assert torch.equal(prediction[i], p[0]) and torch.allclose(rows[i], row[0], rtol=1e-12)
    confusion = stage2_pseudolabel.by_field(rows.numpy(), 4)["confusion"]
    assert (prediction[:, -1] == 255).all() and confusion.sum() == ((targets != 255).sum() - 5 * 7)  # region not judged


def test_an_ignore_region_is_255_in_the_mask_and_out_of_the_figures():
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).reshape(1, 2, 1, 2)
    prediction, _, rows = stage2_pseudolabel.batch_stats(probs, torch.tensor([[[0, 1]]]), 2, torch.tensor([[False, True]]))
    assert prediction.tolist() == [[[0, 255]]]
    fields = stage2_pseudolabel.by_field(rows.numpy(), 2)
    assert fields["confusion"][0].tolist() == [1, 0, 0, 0]  # the region's pixel is not compared with the truth
    assert fields["pixels"][0, 0] == 2 and fields["has_truth"][0, 0] == 1


def test_reliability_and_calibration_error_from_the_rows(tmp_path):
    """stats.json's reliability table and ECE, from two images' rows."""
    os.makedirs(tmp_path / "image_stats")
    probs = torch.tensor([[0.95, 0.95, 0.55, 0.55], [0.05, 0.05, 0.45, 0.45]]).reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 0, 0]]])  # bin 0.9-1.0: 1 of 2 right; bin 0.5-0.6: 2 of 2 right
    _, _, rows = stage2_pseudolabel.batch_stats(probs, target, 2)
    for image_id in ["a", "b"]:
        np.save(tmp_path / "image_stats" / f"{image_id}.npy", rows[0].numpy())
    stats = stage2_pseudolabel.summarize(str(tmp_path), [], ["a", "b"], ["x", "y"])["unlabeled"]
    bins = {round(b["bin"][0], 1): b for b in stats["reliability"]}
    assert bins[0.9]["accuracy"] == pytest.approx(0.5) and bins[0.9]["mean_max_prob"] == pytest.approx(0.95)
    assert bins[0.5]["accuracy"] == pytest.approx(1.0) and bins[0.5]["share_of_pixels"] == pytest.approx(0.5)
    assert bins[0.1]["accuracy"] is None
    assert stats["calibration_error"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_same_output_whatever_the_batch_size_and_the_writer_threads(trained, tmp_path):
    _, checkpoint = trained
    pseudolabel(checkpoint, str(tmp_path / "one"), "--batch-size", 1)
    run_script("stage2_pseudolabel.py", "--checkpoint", checkpoint, "--out", tmp_path / "four", "--batch-size", 4,
               "--workers", 2, "--device", "cpu")
    for image_id in TRAIN_IDS:
        a = np.array(Image.open(tmp_path / "one" / "masks" / f"{image_id}.png"))
        b = np.array(Image.open(tmp_path / "four" / "masks" / f"{image_id}.png"))
        assert np.array_equal(a, b)
        assert np.allclose(np.load(tmp_path / "one" / "image_stats" / f"{image_id}.npy"),
                           np.load(tmp_path / "four" / "image_stats" / f"{image_id}.npy"), rtol=1e-5)  # conv rounding


def test_rerun_skips_finished_images_and_completes_an_interrupted_run(trained, tmp_path):
    _, checkpoint = trained
    out = tmp_path / "pseudo"
    pseudolabel(checkpoint, str(out))
    first = json.load(open(out / "stats.json"))
    # As an interruption leaves it: two images missing, one with its figures but not its PNG.
    finished = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = pseudolabel(checkpoint, str(out))  # a finished folder is left exactly as it is
    assert "nothing to do" in result.stdout
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == finished
    os.remove(out / "masks" / f"{TRAIN_IDS[0]}.png")
    os.remove(out / "masks" / f"{TRAIN_IDS[1]}.png")
    os.remove(out / "image_stats" / f"{TRAIN_IDS[1]}.npy")
    kept = os.path.getmtime(out / "masks" / f"{TRAIN_IDS[5]}.png")
    result = pseudolabel(checkpoint, str(out))
    assert f"{len(TRAIN_IDS) - 2} already done" in result.stdout and "wrote 2 pseudo-masks" in result.stdout
    assert os.path.getmtime(out / "masks" / f"{TRAIN_IDS[5]}.png") == kept
    second = json.load(open(out / "stats.json"))
    for group in ["labeled", "unlabeled"]:
        assert second[group]["miou"] == pytest.approx(first[group]["miou"])
        assert second[group]["mean_entropy"] == pytest.approx(first[group]["mean_entropy"])


def test_refuses_to_mix_two_checkpoints_and_overwrite_removes_only_its_own_files(trained, tmp_path):
    voc_root, checkpoint = trained
    out = str(tmp_path / "pseudo")
    pseudolabel(checkpoint, out)
    (tmp_path / "pseudo" / "my_notes.txt").write_text("mine")
    other = str(tmp_path / "other")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 4, *TINY_TRAIN, "--seed", 5, "--out", other)
    result = pseudolabel(other, out, check=False)
    assert_user_error(result, f"--out {out} holds the pseudo-masks of {checkpoint} (step 30)", "--overwrite")
    result = pseudolabel(other, out, "--overwrite")
    assert "0 already done" in result.stdout
    assert json.load(open(os.path.join(out, "run.json")))["checkpoint"] == os.path.join(other, "checkpoint.pt")
    assert (tmp_path / "pseudo" / "my_notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["the dataset's masks", "a folder of my own PNGs"])
def test_a_folder_it_did_not_write_is_never_touched_even_with_overwrite(trained, tmp_path, where):
    voc_root, checkpoint = trained
    data = shutil.copytree(voc_root, tmp_path / "VOC2012")
    if where == "the dataset's masks":
        out = data / "SegmentationClass"
        fragment = "which this command reads"
    else:
        out = tmp_path / "photos"
        out.mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out / "holiday.png")
        fragment = "holds files that stage2_pseudolabel.py did not write (holiday.png"
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for flags in [[], ["--overwrite"]]:
        result = pseudolabel(checkpoint, str(out), "--data-root", data, *flags, check=False)
        assert_user_error(result, fragment)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_previous_rounds_are_shown_beside_this_one(trained, tmp_path):
    voc_root, checkpoint = trained
    pseudolabel(checkpoint, str(tmp_path / "round1"))
    result = pseudolabel(checkpoint, str(tmp_path / "round2"), "--previous", tmp_path / "round1")
    assert "pseudo-masks of the unlabelled images" in result.stdout and "(this round)" in result.stdout
    assert Image.open(tmp_path / "round2" / "preview.png").size[0] == 4 * 164 + 4  # image, truth, round 1, round 2
    other = str(tmp_path / "other")
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 5, *TINY_TRAIN, "--out", other)
    result = pseudolabel(other, str(tmp_path / "round3"), "--previous", tmp_path / "round1", check=False)
    assert_user_error(result, "--previous", "another split")


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
    other = tmp_path / "other"
    shutil.copytree(voc_root, other)
    (other / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{TRAIN_IDS[0]}\n")  # now a val image
    result = pseudolabel(checkpoint, str(tmp_path / "p3"), "--data-root", str(other), check=False)
    assert_user_error(result, f"was trained with the image {TRAIN_IDS[0]}, which is not a training image of {other}")


def test_an_unfinished_folder_of_an_earlier_version_is_made_again_whole(trained, tmp_path):
    """Its per-image figures lack what this version ranks by: every image is labelled again, none mixed."""
    _, checkpoint = trained
    out = tmp_path / "pseudo"
    pseudolabel(checkpoint, out)
    record = json.loads((out / "run.json").read_text())
    del record["figures"]  # as written before the margin was among them
    (out / "run.json").write_text(json.dumps(record))
    os.remove(out / "stats.json")
    length = len(np.load(out / "image_stats" / f"{TRAIN_IDS[0]}.npy"))
    for image_id in TRAIN_IDS:  # an earlier version's rows, one figure short
        np.save(out / "image_stats" / f"{image_id}.npy", np.zeros(length - 1))
    result = pseudolabel(checkpoint, out)
    assert f"{len(TRAIN_IDS)} training images, 0 already done" in result.stdout
    assert all(len(np.load(out / "image_stats" / f"{i}.npy")) == length for i in TRAIN_IDS)
