"""The official downloads laid out as they come: ADE20K's ADEChallengeData2016.zip, COCO's train2017/, val2017/ and
annotations/ zips, Cityscapes with its coarse train_extra/; each through prepare_data.py where it needs it, stage 1,
pseudo-labelling and evaluation, read right (classes, split, masks). Cityscapes' predictions in its label ids."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import common
from conftest import CS_VAL, TINY_TRAIN, assert_user_error, run_script, write_cityscapes_tree
from test_layouts import SIZE, classes_of, image_of, prepare, run_scripts, save

# The first rows of ADE20K's class table: objectInfo150.txt as the download has it (tab-separated, a header,
# synonyms by commas), and the development kit's objectInfo150.csv.
ADE_INFO = {"objectInfo150.txt": "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
                                 "2\t0.1072\t6046\t612\tbuilding, edifice\n3\t0.0878\t8265\t796\tsky\n",
            "objectInfo150.csv": "Idx,Ratio,Train,Val,Name\n1,0.1576,11664,1172,wall\n2,0.1072,6046,612,building;edifice\n"
                                 "3,0.0878,8265,796,sky\n"}


@pytest.mark.parametrize("info", list(ADE_INFO))
def test_ade20k_as_downloaded(tmp_path, info):
    source = tmp_path / "ADEChallengeData2016"
    for split, count in [("training", 6), ("validation", 2)]:
        for index in range(count):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{index + 1:08d}"
            save(str(source / "images" / split / f"{name}.jpg"), image_of(index))
            save(str(source / "annotations" / split / f"{name}.png"), classes_of(index) + 1)  # 0 is "other"
    (source / info).write_text(ADE_INFO[info])
    (source / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    root, said = prepare(source, tmp_path / "data")
    assert (root / "classes.txt").read_text().splitlines() == ["__ignore__ = 0", "wall = 1", "building = 2", "sky = 3"]
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["wall", "building", "sky"] and d.val_ids == [f"validation/ADE_val_0000000{i}" for i in [1, 2]]
    assert np.array_equal(common.SegmentationDataset(d, [d.train_ids[1]])[0][1].numpy(), classes_of(1))
    assert set(val["per_class"]) == {"wall", "building", "sky"}


def test_no_class_colour_is_close_to_the_ignore_colours():
    """ADE20K's class 64 (index 63) was grey, next to the (224, 224, 192) of 255 in the PNGs and the white of
    ignore in the pictures; with up to 252 classes none is now. The palette stays one of distinct colours, and
    VOC's own."""
    palette = common.colour_palette()
    colours = [tuple(palette[3 * i:3 * i + 3]) for i in range(256)]
    for i in range(1, 252):
        assert min(math.dist(colours[i], (224, 224, 192)), math.dist(colours[i], (255, 255, 255))) > 60, i
    assert len(set(colours)) == 256 and colours[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert colours[15] == (192, 128, 128) and colours[255] == (224, 224, 192)  # person; the border


def coco_json(images, annotations, categories=({"id": 1, "name": "cat"}, {"id": 2, "name": "dog"})):
    return json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                       "categories": list(categories)})


def test_coco_as_downloaded_with_the_same_file_names_in_train2017_and_val2017(tmp_path):
    """annotations/instances_{train,val}2017.json with bare file names; captions and person keypoints beside them;
    train2017/ and val2017/ share file names; image_info_test2017.json lists test2017/ (one image not there)."""
    source = tmp_path / "coco"
    box = [[4, 4, 20, 4, 20, 16, 4, 16]]
    for split, category in [("train2017", 1), ("val2017", 2)]:
        count = 6 if split == "train2017" else 2
        images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": SIZE[0], "width": SIZE[1]}
                  for i in range(count)]
        for image in images:
            save(str(source / split / image["file_name"]), image_of(image["id"]))
        instances = [{"id": i + 1, "image_id": i + 1, "category_id": category, "segmentation": box, "bbox": [4, 4, 16, 12],
                      "iscrowd": 0, "area": 192} for i in range(count)]
        (source / "annotations").mkdir(exist_ok=True)
        (source / "annotations" / f"instances_{split}.json").write_text(coco_json(images, instances))
        captions = [{"id": i + 1, "image_id": i + 1, "caption": "a cat"} for i in range(count)]
        (source / "annotations" / f"captions_{split}.json").write_text(coco_json(images, captions, ()))
        keypoints = [{**a, "keypoints": [0] * 51, "num_keypoints": 0} for a in instances]
        (source / "annotations" / f"person_keypoints_{split}.json").write_text(coco_json(images, keypoints))
    save(str(source / "test2017" / "000000000001.jpg"), image_of(50))
    save(str(source / "test2017" / "000000000002.jpg"), image_of(51))  # in no JSON
    test_info = [{"id": i, "file_name": f"{i:012d}.jpg", "height": SIZE[0], "width": SIZE[1]} for i in [1, 7]]
    (source / "annotations" / "image_info_test2017.json").write_text(coco_json(test_info, []))  # 7: not there
    root, said = prepare(source, tmp_path / "data")
    assert "captions_train2017.json (captions: no masks)" in said
    assert "person_keypoints_val2017.json (keypoints: images another JSON holds the masks of)" in said
    assert "image_info_test2017.json (a test set)" in said and "the 1 images of test folders in no JSON" in said
    assert (root / "classes.txt").read_text() == "background\ncat\ndog\n"
    assert (root / "val.txt").read_text() == "val2017/000000000001\nval2017/000000000002\n"
    train, val_mask = (np.array(Image.open(root / "masks" / s / "000000000001.png")) for s in ["train2017", "val2017"])
    assert train[10, 10] == 1 and val_mask[10, 10] == 2 and train[0, 0] == val_mask[0, 0] == 0  # each its own JSON's
    d, val, stats = run_scripts(root, tmp_path)
    assert len(d.train_ids) == 6 and d.val_ids == ["val2017/000000000001", "val2017/000000000002"]


def test_cityscapes_coarse_images_are_said_to_be_left_out(tmp_path):
    root = write_cityscapes_tree(str(tmp_path / "cityscapes"))
    save(os.path.join(root, "leftImg8bit", "train_extra", "bad_honnef", "bad_honnef_000000_000000_leftImg8bit.png"),
         image_of(0))
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--image-scale", 0.5,
                        "--out", tmp_path / "s1")
    assert "train_extra/ (the coarsely annotated images) is not used" in result.stdout


@pytest.fixture(scope="module")
def cityscapes_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("label_ids")
    root = write_cityscapes_tree(str(base / "cityscapes"))
    run_script("stage1_train.py", "--data-root", root, "--labeled", 3, *TINY_TRAIN, "--crop-size", 16,
               "--out", base / "s1")
    return root, base


def test_cityscapes_predictions_in_label_ids_for_the_benchmark_server(cityscapes_run, tmp_path):
    root, base = cityscapes_run
    run_script("evaluate.py", "--checkpoint", base / "s1", "--workers", 0, "--save-dir", tmp_path / "train_ids")
    run_script("evaluate.py", "--checkpoint", base / "s1", "--workers", 0, "--save-dir", tmp_path / "ids",
               "--label-ids")
    _, to_id, palette = common.cityscapes_label_ids()
    for image_id in CS_VAL["frankfurt"]:
        train_ids = np.array(Image.open(tmp_path / "train_ids" / f"{image_id}.png"))
        ids = Image.open(tmp_path / "ids" / f"{image_id}.png")
        assert np.array_equal(np.array(ids), to_id[train_ids]) and ids.getpalette()[:24 * 3] == palette[:24 * 3]
        assert set(np.unique(np.array(ids))) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    test = tmp_path / "leftImg8bit" / "test" / "berlin"
    save(str(test / "berlin_000000_000019_leftImg8bit.png"), image_of(3))
    run_script("evaluate.py", "--checkpoint", base / "s1", "--images", tmp_path / "leftImg8bit" / "test",
               "--save-dir", tmp_path / "test_ids", "--label-ids", "--workers", 0)
    written = np.array(Image.open(tmp_path / "test_ids" / "berlin" / "berlin_000000_000019_leftImg8bit.png"))
    assert set(np.unique(written)) <= set(to_id[:19].tolist())  # named as the server finds it: <city>_<seq>_<frame>*
    assert_user_error(run_script("evaluate.py", "--checkpoint", base / "s1", "--label-ids", check=False),
                      "--label-ids is how --save-dir's predictions are written")


def test_label_ids_are_refused_for_other_classes(voc_root, tmp_path):
    run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "s1")
    assert_user_error(run_script("evaluate.py", "--checkpoint", tmp_path / "s1", "--save-dir", tmp_path / "p",
                                 "--label-ids", check=False), "does not predict Cityscapes' 19 classes")


def test_a_binary_dataset_whose_every_image_has_a_mask_says_so(tmp_path):
    root = tmp_path / "kaggle"
    for index in range(6):
        save(str(root / "images" / f"{index}.png"), image_of(index))
        save(str(root / "masks" / f"{index}_mask.png"), np.where(classes_of(index) == 1, 255, 0).astype(np.uint8))
    notes = common.describe_dataset(str(root)).notes
    assert "masks: every one of the 6 images has one" in notes and not any("unlabelled" in n for n in notes)
