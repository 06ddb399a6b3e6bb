"""Cityscapes as it is distributed: the layout, the id mapping, both mask kinds, both split-file
forms, every script on a tiny tree, sliding-window evaluation, and the bad inputs."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import evaluate
import stage1_train
from conftest import (CS_RAW_TO_TRAIN, CS_SIZE, CS_TRAIN, CS_VAL, ROOT, assert_user_error, cityscapes_raw_mask,
                      run_script, write_cityscapes_tree)

def make_split(description, labeled, seed=0, labeled_list=None):
    args = argparse.Namespace(labeled=labeled, protocol="classic", split_seed=seed, labeled_list=labeled_list,
                              unlabeled_list=None, add_labeled=None)
    return stage1_train.make_split(description, args)[:2]


TRAIN = sorted(i for ids in CS_TRAIN.values() for i in ids)
VAL = sorted(i for ids in CS_VAL.values() for i in ids)
TINY = ["--backbone", "tiny_unet", "--no-pretrained", "--image-scale", "0.5", "--crop-size", "16", "24",
        "--scale-range", "1", "1", "--workers", "0", "--device", "cpu", "--print-every", "1"]


def test_the_layout_is_recognised_with_the_official_classes(cityscapes_root):
    description = common.describe_dataset(cityscapes_root)
    assert description.kind == "cityscapes" and description.train_ids == TRAIN and description.val_ids == VAL
    assert description.class_names[:3] == ["road", "sidewalk", "building"] and len(description.class_names) == 19
    assert description.class_names[-1] == "bicycle"
    assert description.palette[:6] == [128, 64, 128, 244, 35, 232]  # road and sidewalk, Cityscapes' colours
    assert description.images[TRAIN[0]].endswith(os.path.join("leftImg8bit", "train", "aachen", f"{TRAIN[0]}_leftImg8bit.png"))


def test_raw_label_ids_map_to_train_ids_and_255(cityscapes_root):
    description = common.describe_dataset(cityscapes_root)
    _, mask, _ = common.SegmentationDataset(description, [TRAIN[0]])[0]
    raw = cityscapes_raw_mask(0)
    for raw_id, train_id in CS_RAW_TO_TRAIN.items():
        assert (mask.numpy()[raw == raw_id] == train_id).all(), raw_id


def test_both_mask_kinds_give_the_same_classes(tmp_path):
    raw_root = write_cityscapes_tree(str(tmp_path / "raw"), kinds=("labelIds",))
    train_root = write_cityscapes_tree(str(tmp_path / "train"), kinds=("labelTrainIds",))
    masks = []
    for root in [raw_root, train_root]:
        description = common.describe_dataset(root)
        masks.append([common.SegmentationDataset(description, [i])[0][1] for i in TRAIN + VAL])
    assert all(torch.equal(a, b) for a, b in zip(*masks))
    assert common.describe_dataset(train_root).label_table is None


def test_an_unknown_raw_id_is_named(cityscapes_root):
    description = common.describe_dataset(cityscapes_root)
    raw = cityscapes_raw_mask(0)
    raw[0, 0] = 77
    Image.fromarray(raw, mode="L").save(description.masks[TRAIN[0]])
    with pytest.raises(common.UserError, match="has the value 77, which is no class's"):
        common.SegmentationDataset(description, [TRAIN[0]])[0]


def test_labeled_draws_from_the_train_images_only(cityscapes_root):
    description = common.describe_dataset(cityscapes_root)
    for seed in range(5):
        labeled, unlabeled = make_split(description, 4, seed=seed)
        assert len(labeled) == 4 and sorted(labeled + unlabeled) == TRAIN
    with pytest.raises(common.UserError, match="draws from the 9 training images with a mask"):
        make_split(description, 10)


def test_both_split_file_forms(cityscapes_root, tmp_path):
    description = common.describe_dataset(cityscapes_root)
    paired = tmp_path / "paired.txt"
    paired.write_text("".join(f"leftImg8bit/train/{i.split('_')[0]}/{i}_leftImg8bit.png "
                              f"gtFine/train/{i.split('_')[0]}/{i}_gtFine_labelTrainIds.png\n" for i in TRAIN[:3]))
    bare = tmp_path / "bare.txt"
    bare.write_text("".join(f"{i}\n" for i in TRAIN[3:5]))
    assert make_split(description, None, labeled_list=str(paired))[0] == TRAIN[:3]
    assert make_split(description, None, labeled_list=str(bare))[0] == TRAIN[3:5]
    voc = os.path.join(ROOT, "splits", "unimatch", "pascal", "92_labeled.txt")
    with pytest.raises(common.UserError, match="is a split file of voc, but --data-root .* is cityscapes"):
        make_split(description, None, labeled_list=voc)


@pytest.mark.parametrize("name,count", [("ke2022/cityscapes_100_labeled.txt", 100), ("unimatch/cityscapes/1_30_labeled.txt", 100)])
def test_the_shipped_cityscapes_split_files_are_read_as_they_are(tmp_path, name, count):
    path = os.path.join(ROOT, "splits", name)
    root = tmp_path / "cityscapes"
    tiny = Image.fromarray(np.zeros((4, 8, 3), np.uint8))
    raw = Image.fromarray(np.full((4, 8), 7, np.uint8), mode="L")
    for line in open(path).read().split("\n"):
        if line.strip():
            image = root / line.split()[0]
            image.parent.mkdir(parents=True, exist_ok=True)
            tiny.save(image)
            gt = root / line.split()[1].replace("labelTrainIds", "labelIds")  # only the official masks here
            gt.parent.mkdir(parents=True, exist_ok=True)
            raw.save(gt)
    (root / "leftImg8bit" / "val").mkdir()
    (root / "gtFine" / "val").mkdir()
    labeled, unlabeled = make_split(common.describe_dataset(str(root)), count, labeled_list=path)
    assert len(labeled) == count and unlabeled == []


def test_bad_inputs_are_one_line(cityscapes_root, tmp_path):
    description = common.describe_dataset(cityscapes_root)
    ghost = tmp_path / "ghost.txt"
    ghost.write_text("leftImg8bit/train/jena/jena_000999_000019_leftImg8bit.png gtFine/train/jena/x.png\n")
    with pytest.raises(common.UserError, match="split id jena_000999_000019 has no image"):
        make_split(description, None, labeled_list=str(ghost))
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(description.masks[TRAIN[1]])
    with pytest.raises(common.UserError, match="is 5x5 but its image is 48x32"):
        common.SegmentationDataset(description, [TRAIN[1]])[0]
    os.rename(os.path.join(cityscapes_root, "gtFine"), os.path.join(cityscapes_root, "gtFine_moved"))
    result = run_script("stage1_train.py", "--data-root", cityscapes_root, "--labeled", 2, *TINY, "--iters", 1,
                        "--out", tmp_path / "s1", check=False)
    assert_user_error(result, "has leftImg8bit/ but no gtFine/")


def test_every_script_runs_on_cityscapes(cityscapes_root, tmp_path):
    s1, p1, s2 = (str(tmp_path / name) for name in ["stage1", "pseudo1", "stage2"])
    result = run_script("stage1_train.py", "--data-root", cityscapes_root, "--labeled", 4, *TINY, "--batch-size", 2,
                        "--iters", 2, "--out", s1)
    assert result.stdout.startswith(f"cityscapes data in {cityscapes_root}: 9 training images (9 with a mask, 0 without), 3 val images, "
                                    "19 classes")
    assert "this run: 4 labelled and 5 unlabelled training images" in result.stdout
    result = run_script("stage2_pseudolabel.py", "--checkpoint", os.path.join(s1, "checkpoint.pt"), "--out", p1, "--workers", 0)
    assert "ego vehicle: 6.2% of each image, from 4 labelled masks" in result.stdout
    for image_id in TRAIN:  # flat: ids are unique without the city folder; at the image's own size
        png = Image.open(os.path.join(p1, "masks", f"{image_id}.png"))
        assert png.size == CS_SIZE[::-1] and png.getpalette()[:3] == [128, 64, 128]
        assert (np.array(png)[-4:, 12:36] == 255).all()  # the ego vehicle is left out of every pseudo-mask
    run_script("stage3_multitask.py", *TINY, "--batch-labeled", 1,
               "--batch-unlabeled", 2, "--iters", 2, "--w-sup", 0.5, "--pseudo", p1, "--out", s2)
    report = str(tmp_path / "val.json")
    run_script("evaluate.py", "--checkpoint", os.path.join(s2, "checkpoint.pt"), "--workers", 0, "--json", report,
               "--save-dir", tmp_path / "pred")
    assert len(json.load(open(report))["per_class"]) == 19
    assert sorted(os.listdir(tmp_path / "pred")) == sorted([f"{i}.png" for i in VAL] + ["run.json"])
    run_script("evaluate.py", "--checkpoint", os.path.join(s2, "checkpoint.pt"), "--workers", 0, "--window", 8, 16,
               "--stride", 4, 8)


class PerPixel(nn.Module):
    """A model whose prediction at a pixel depends on that pixel alone: tiled and whole agree."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 19, 1)

    def forward(self, x, with_aux=False):
        return self.conv(x)


@pytest.mark.parametrize("window,stride", [((8, 16), (4, 8)), ((12, 20), (12, 20)), ((40, 60), (10, 10))])
def test_sliding_window_agrees_with_the_whole_image_on_a_per_pixel_model(window, stride):
    torch.manual_seed(0)
    model, images = PerPixel().eval(), torch.randn(2, 3, *CS_SIZE)
    whole = common.image_probs(model, images)
    tiled = evaluate.window_probs(model, images, argparse.Namespace(window=window, stride=stride, amp=False), 1.0)
    assert torch.allclose(whole, tiled, atol=1e-6)
    assert evaluate.window_starts(32, 8, 4)[-1] == 24 and evaluate.window_starts(48, 20, 20) == [0, 20, 28]
