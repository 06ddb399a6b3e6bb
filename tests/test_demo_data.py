"""make_demo_data.py writes a VOC-layout dataset that the loader reads as any other."""
import os

import numpy as np
from PIL import Image

import common
from conftest import run_script


def test_demo_data_is_a_valid_voc_tree(tmp_path):
    root = str(tmp_path / "VOC2012")
    result = run_script("make_demo_data.py", "--out", root, "--train", 6, "--val", 3)
    assert "wrote 6 training and 3 val images" in result.stdout
    description = common.describe_dataset(root)
    names = description.class_names
    assert names == ["background", "disk", "square", "triangle", "ring", "cross"]
    labeled, unlabeled = common.make_split(description, 2)
    assert len(labeled) == 2 and len(unlabeled) == 4
    dataset = common.true_mask_dataset(description, labeled + unlabeled)
    labels = np.unique(np.concatenate([dataset[i][1].numpy().ravel() for i in range(len(dataset))]))
    assert set(labels) <= set(range(len(names))) | {255} and 0 in labels and 255 in labels and len(labels) > 3
    assert Image.open(os.path.join(root, "JPEGImages", f"{labeled[0]}.jpg")).size == (64, 64)
    assert "not rewritten" in run_script("make_demo_data.py", "--out", root).stdout  # never mixes two datasets
