"""make_demo_data.py writes a dataset, in the VOC layout or your own data's, that the loader reads as any other."""
import argparse
import json
import os

import numpy as np
from PIL import Image

import common
import make_demo_data
import stage1_train
from conftest import assert_user_error, run_script


def test_demo_data_is_a_valid_voc_tree(tmp_path):
    root = str(tmp_path / "VOC2012")
    result = run_script("make_demo_data.py", "--out", root, "--train", 9, "--train-txt", 4, "--val", 3, "--size", 40)
    assert "wrote 9 training images (4 in the labelled pool) and 3 val images" in result.stdout
    description = common.describe_dataset(root)
    names = description.class_names
    assert names == ["background", "disk", "square", "triangle", "ring", "cross"]
    assert len(description.train_ids) == 9 and len(description.val_ids) == 3
    # The classic protocol draws the labelled images from train.txt's four only.
    args = argparse.Namespace(labeled=2, protocol="classic", split_seed=0, labeled_list=None, unlabeled_list=None, add_labeled=None)
    labeled, unlabeled, _ = stage1_train.make_split(description, args)
    assert len(labeled) == 2 and set(labeled) <= {f"train_{i:05d}" for i in range(4)} and len(unlabeled) == 7
    dataset = common.SegmentationDataset(description, labeled + unlabeled)
    labels = np.unique(np.concatenate([dataset[i][1].numpy().ravel() for i in range(len(dataset))]))
    assert set(labels) <= set(range(len(names))) | {255} and 0 in labels and 255 in labels and len(labels) > 3
    assert Image.open(description.images[labeled[0]]).size == (40, 40)
    again = run_script("make_demo_data.py", "--out", root, "--train", 9, "--train-txt", 4, "--val", 3, "--size", 40)
    assert "not rewritten" in again.stdout


def test_the_folder_layout_is_your_own_data_with_masks_for_the_pool_and_val(tmp_path):
    voc, folder = str(tmp_path / "voc"), str(tmp_path / "folder")
    for root, layout in [(voc, "voc"), (folder, "folder")]:
        run_script("make_demo_data.py", "--out", root, "--layout", layout, "--train", 8, "--train-txt", 3, "--val", 2,
                   "--size", 24)
    d = common.describe_dataset(folder)
    assert d.kind == "folder" and d.val_ids == ["val_00000", "val_00001"] and sorted(d.pool) == [f"train_{i:05d}" for i in range(3)]
    assert [i for i in d.train_ids if d.masks[i]] == d.pool  # the rest are unlabelled: no mask at all
    v = common.describe_dataset(voc)
    for image_id in d.pool + d.val_ids:  # the same images and masks as the VOC layout's
        assert np.array_equal(np.array(Image.open(d.masks[image_id])), np.array(Image.open(v.masks[image_id])))
        assert open(d.images[image_id], "rb").read() == open(v.images[image_id], "rb").read()


def test_a_folder_written_by_other_settings_or_someone_else_is_refused(tmp_path):
    root = str(tmp_path / "VOC2012")
    run_script("make_demo_data.py", "--out", root, "--train", 4, "--train-txt", 2, "--val", 1)
    assert json.load(open(os.path.join(root, "run.json")))["recipe"]["train_txt"] == 2
    result = run_script("make_demo_data.py", "--out", root, "--train", 4, "--train-txt", 2, "--val", 1, "--field-variety", check=False)
    assert_user_error(result, "was made with --field-variety False, this command asks for --field-variety True")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"mine")
    result = run_script("make_demo_data.py", "--out", mine, "--train", 4, "--train-txt", 2, "--val", 1, check=False)
    assert_user_error(result, "holds files that make_demo_data.py did not write")
    assert os.listdir(mine) == ["photo.jpg"]


def test_field_variety_leaves_the_pool_plain(tmp_path):
    """With --field-variety only the images outside the pool change; the pool's are as without it."""
    roots = {}
    for name, extra in [("plain", []), ("varied", ["--field-variety"])]:
        roots[name] = str(tmp_path / name / "VOC2012")
        run_script("make_demo_data.py", "--out", roots[name], "--train", 8, "--train-txt", 3, "--val", 4, "--size", 40, *extra)

    def mask(name, image_id):
        return np.array(Image.open(os.path.join(roots[name], "SegmentationClass", f"{image_id}.png")))
    for i in range(3):
        assert np.array_equal(mask("plain", f"train_{i:05d}"), mask("varied", f"train_{i:05d}"))
    others = [f"train_{i:05d}" for i in range(3, 8)] + [f"val_{i:05d}" for i in range(4)]
    assert any(not np.array_equal(mask("plain", i), mask("varied", i)) for i in others)


def test_colours_come_from_the_palette_unless_any_colour():
    """The demo's colours are the palette's eight (so the labelled images show every one of them);
    --any-colour draws from the whole RGB cube, as the earlier task did."""
    rng = np.random.default_rng(0)
    palette = {tuple(c) for c in make_demo_data.PALETTE}
    drawn = {tuple(make_demo_data.pick_colour(rng, any_colour=False)) for _ in range(200)}
    assert drawn == palette
    assert not any(tuple(make_demo_data.pick_colour(rng, any_colour=True)) in palette for _ in range(200))
