"""prepare_data.py reads and checks everything before it writes anything: a malformed or ambiguous export is one
line naming the file and the entry, and nothing is left behind; what it writes, the scripts read as it meant."""
import json
import os

import numpy as np
import pytest

import common
from conftest import assert_user_error, run_script
from test_layouts import SIZE, classes_of, image_of, prepare, save

BOX = [[4, 4, 20, 4, 20, 16, 4, 16]]


def coco_source(root, images=None, annotations=None, categories=None, count=3):
    """A COCO export: train/ with `count` images and _annotations.coco.json, each entry replaceable."""
    for index in range(count):
        save(str(root / "train" / f"img{index}.jpg"), image_of(index))
    images = images if images is not None else [
        {"id": i, "file_name": f"img{i}.jpg", "height": SIZE[0], "width": SIZE[1]} for i in range(count)]
    annotations = annotations if annotations is not None else [
        {"id": i, "image_id": i, "category_id": 1, "segmentation": BOX} for i in range(count)]
    categories = categories if categories is not None else [{"id": 1, "name": "cat"}]
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


def refused(source, tmp_path, *fragments):
    assert_user_error(run_script("prepare_data.py", source, "--out", tmp_path / "out", check=False), *fragments)
    assert not (tmp_path / "out").exists()  # nothing half-written: not even the folder


def image(i, **changes):
    entry = {"id": i, "file_name": f"img{i}.jpg", "height": SIZE[0], "width": SIZE[1], **changes}
    return {k: v for k, v in entry.items() if v is not None}


def annotation(i, **changes):
    entry = {"id": i, "image_id": i, "category_id": 1, "segmentation": BOX, **changes}
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("images,annotations,categories,fragments", [
    (None, [annotation(i, segmentation=None, bbox=[4, 4, 16, 12]) for i in range(3)], None,
     ["holds boxes (bbox), not masks: a detection export"]),
    (None, [annotation(0, segmentation={"size": [10, 10], "counts": [100]})], None,
     ["has an RLE mask of size [10, 10], but its image is [32, 40]"]),
    (None, [annotation(0, segmentation={"size": list(SIZE), "counts": [5, 3]})], None,
     ["has RLE counts that do not cover its image"]),
    (None, [annotation(0, category_id=9)], None, ["names an image_id or a category_id the file does not list"]),
    (None, [annotation(0, image_id=None)], None, ["names an image_id or a category_id the file does not list"]),
    ([image(0), image(1, file_name=None), image(2)], None, None, ["has no file_name"]),
    ([image(0), image(1, height=None), image(2)], None, None, ["has no height"]),
    (None, None, [{"id": 1}], ["the category {'id': 1} has no id, no name"]),
    ([image(0), image(1), image(1, file_name="img2.jpg")], None, None, ["has the id of another image"]),
    ([image(0), image(1), image(2, file_name="img1.jpg")], None, None, ["has the file_name of another image"]),
    (None, [annotation(0, segmentation=[[1, 2, 3]])], None, ["has a polygon that is not a list of x, y numbers"]),
])
def test_a_malformed_coco_file_is_one_line_and_nothing_is_written(tmp_path, images, annotations, categories,
                                                                    fragments):
    source = coco_source(tmp_path / "coco", images, annotations, categories)
    refused(source, tmp_path, "_annotations.coco.json", *fragments)


def test_too_many_categories_for_a_mask_are_refused(tmp_path):
    categories = [{"id": c, "name": f"thing {c}"} for c in range(1, 256)]  # the 255th would be 255, ignore
    refused(coco_source(tmp_path / "coco", categories=categories), tmp_path, "255 categories; a mask holds 254")
    categories = [{"id": c, "name": f"thing {c}"} for c in range(1, 255)]
    root, _ = prepare(coco_source(tmp_path / "ok", categories=categories), tmp_path / "data")
    assert len(common.describe_dataset(str(root)).class_names) == 255


@pytest.mark.parametrize("name,fragment", [("#1", "cannot be written in a class list"),
                                            ("a = b", "cannot be written in a class list"),
                                            ("", "cannot be written in a class list")])
def test_category_names_a_class_list_would_misread_are_refused(tmp_path, name, fragment):
    refused(coco_source(tmp_path / "coco", categories=[{"id": 1, "name": name}]), tmp_path, fragment)


def test_two_categories_of_one_name_are_refused(tmp_path):
    refused(coco_source(tmp_path / "coco", categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]),
            tmp_path, "category 2: the class name 'cat' is also", "category 1's")


def roboflow_source(root, classes_csv):
    for split, count in [("train", 4), ("valid", 2)]:
        for index in range(count):
            save(str(root / split / f"{split}{index}.jpg"), image_of(index))
            save(str(root / split / f"{split}{index}_mask.png"), classes_of(index))
        (root / split / "_classes.csv").write_text(classes_csv)
    return root


@pytest.mark.parametrize("classes_csv,fragments", [
    ("Pixel Value, Class, Extra\n0, background, x\n", ["_classes.csv line 1: a header of two columns is expected"]),
    ("Pixel Value, Class\n0, background\n1, cat, more\n", ["_classes.csv line 3", "is not a row of a value"]),
    ("Pixel Value, Class\n0, background\none, cat\n", ["_classes.csv line 3", "is not a row of a value"]),
    ("Pixel Value, Class\n0, background\n1, #cat\n", ["_classes.csv line 3", "cannot be written in a class list"]),
    ("Pixel Value, Class\n0, background\n1, cat\n2, cat\n", ["_classes.csv line 4: the class name 'cat' is also"]),
])
def test_a_malformed_roboflow_class_table_is_one_line(tmp_path, classes_csv, fragments):
    refused(roboflow_source(tmp_path / "roboflow", classes_csv), tmp_path, *fragments)


def test_roboflow_names_with_commas_and_a_swapped_header_are_read_as_meant(tmp_path):
    source = roboflow_source(tmp_path / "roboflow", 'Class, Pixel Value\nbackground, 0\n"cat, tabby", 1\ndog, 2\n')
    root, said = prepare(source, tmp_path / "data")
    assert "the class name 'cat, tabby' is written 'cat; tabby'" in said
    d = common.describe_dataset(str(root))
    assert d.class_names == ["background", "cat; tabby", "dog"]
    assert np.array_equal(common.SegmentationDataset(d, ["train/train1"])[0][1].numpy(), classes_of(1))


def test_an_image_listed_in_two_coco_files_is_refused(tmp_path):
    source = coco_source(tmp_path / "coco")
    (source / "more.json").write_text((source / "train" / "_annotations.coco.json").read_text())
    refused(source, tmp_path, "is listed in", "and in", "leave one of them out of the source")


def test_a_class_list_the_scripts_would_refuse_is_refused_by_the_converter_too(tmp_path):
    source = tmp_path / "jpeg"
    for index in range(4):
        save(str(source / "images" / f"{index}.jpg"), image_of(index))
        binary = np.where(classes_of(index) == 1, 255, 0).astype(np.uint8)
        save(str(source / "masks" / f"{index}.jpg"), binary)
    (source / "classes.txt").write_text("background\nthing\nthing\n")
    refused(source, tmp_path, f"{source / 'classes.txt'} line 3: 'thing' is listed twice")
    assert not os.path.exists(tmp_path / "out")
