"""make_demo_data.py writes a VOC-layout dataset that the loader reads as any other."""
import json
import os

import numpy as np
from PIL import Image

import common
from conftest import assert_user_error, run_script


def test_demo_data_is_a_valid_voc_tree(tmp_path):
    root = str(tmp_path / "VOC2012")
    result = run_script("make_demo_data.py", "--out", root, "--studio", 4, "--field", 5, "--val", 3)
    assert "wrote 4 studio and 5 field training images and 3 field val images" in result.stdout
    description = common.describe_dataset(root)
    names = description.class_names
    assert names == ["background", "disk", "square", "triangle", "ring", "cross"]
    assert len(description.train_ids) == 9 and len(description.val_ids) == 3
    # The classic protocol draws the labelled images from the studio images (train.txt) only.
    labeled, unlabeled = common.make_split(description, 2)
    assert len(labeled) == 2 and all(i.startswith("studio") for i in labeled) and len(unlabeled) == 7
    dataset = common.true_mask_dataset(description, labeled + unlabeled)
    labels = np.unique(np.concatenate([dataset[i][1].numpy().ravel() for i in range(len(dataset))]))
    assert set(labels) <= set(range(len(names))) | {255} and 0 in labels and 255 in labels and len(labels) > 3
    assert Image.open(description.images[labeled[0]]).size == (64, 64)
    assert "not rewritten" in run_script("make_demo_data.py", "--out", root, "--studio", 4, "--field", 5, "--val", 3).stdout


def test_a_folder_written_by_other_settings_is_refused(tmp_path):
    root = str(tmp_path / "VOC2012")
    run_script("make_demo_data.py", "--out", root, "--studio", 2, "--field", 2, "--val", 1)
    assert json.load(open(os.path.join(root, "demo_data.json")))["args"]["studio"] == 2
    result = run_script("make_demo_data.py", "--out", root, "--studio", 3, "--field", 2, "--val", 1, check=False)
    assert_user_error(result, "was written by other settings or another version of make_demo_data.py")
