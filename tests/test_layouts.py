"""The datasets people have, laid out exactly as the tools and datasets export them (README, "Your own data"):
each read as it comes or after one prepare_data.py command, then stage 1, pseudo-labelling and evaluation run
on it. Class lists are checked, mask values mapped, JPEG masks named, binary masks come back as they were given."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

import common
from conftest import TINY_TRAIN, assert_user_error, run_script

SIZE = (32, 40)  # (height, width)
COLOURS = [(0, 0, 0), (250, 10, 10), (10, 10, 250)]


def classes_of(index):
    """Background with a square of class 1 and, in every other image, a bar of class 2."""
    mask = np.zeros(SIZE, np.uint8)
    mask[4:14, 5 + index % 6:17 + index % 6] = 1
    if index % 2:
        mask[20:26, 3:35] = 2
    return mask


def image_of(index):
    return np.random.default_rng(index).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


def save(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array, mode="P" if palette else None)
    if palette:
        image.putpalette(palette)
    image.save(path)


def run_scripts(root, tmp_path, labeled=2, *flags):
    """Stage 1, its pseudo-masks and its evaluation on `root`; the description, the val figures and stats.json."""
    run_script("stage1_train.py", "--data-root", root, "--labeled", labeled, *TINY_TRAIN, *flags, "--out", tmp_path / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0)
    run_script("evaluate.py", "--checkpoint", tmp_path / "s1", "--workers", 0, "--json", tmp_path / "val.json")
    return (common.describe_dataset(str(root)), json.load(open(tmp_path / "val.json")),
            json.load(open(tmp_path / "p1" / "stats.json")))


def prepare(source, out):
    result = run_script("prepare_data.py", source, "--out", out)
    return out, result.stdout


# ----------------------------------------------------------------------------- as they come

def test_labelme_labelme2voc_as_it_comes(tmp_path):
    """labelme2voc: JPEGImages/, SegmentationClass/*.npy, SegmentationClassPNG/ (palette, 255 for __ignore__),
    SegmentationClassVisualization/, class_names.txt without a last newline; unlabelled photos added."""
    root = tmp_path / "data_dataset_voc"
    for index in range(8):
        name = f"2011_{index:06d}"
        save(str(root / "JPEGImages" / f"{name}.jpg"), image_of(index))
        if index < 6:
            mask = classes_of(index)
            mask[0, :] = 255  # LabelMe's __ignore__
            save(str(root / "SegmentationClassPNG" / f"{name}.png"), mask, common.colour_palette())
            os.makedirs(root / "SegmentationClass", exist_ok=True)
            np.save(root / "SegmentationClass" / f"{name}.npy", mask.astype(np.int32))
            save(str(root / "SegmentationClassVisualization" / f"{name}.jpg"), image_of(index))
    (root / "class_names.txt").write_text("_background_\ncat\ndog")
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["_background_", "cat", "dog"] and len(d.val_ids) == 1
    assert sum(bool(d.masks[i]) for i in d.train_ids) == 5 and len(d.train_ids) == 7  # 2 unlabelled photos
    assert stats["unlabeled"]["images"] == 5 and set(val["per_class"]) == {"_background_", "cat", "dog"}


def test_labelmes_labels_txt_with_ignore_is_understood_and_said_so(tmp_path):
    root = tmp_path / "voc"
    for index in range(6):
        save(str(root / "JPEGImages" / f"{index}.jpg"), image_of(index))
        save(str(root / "SegmentationClassPNG" / f"{index}.png"), classes_of(index), common.colour_palette())
    (root / "class_names.txt").write_text("__ignore__\n_background_\ncat\ndog\n")
    d = common.describe_dataset(str(root))
    assert d.class_names == ["_background_", "cat", "dog"]
    assert any("__ignore__ is no class" in note for note in d.notes)


def test_cvat_segmentation_mask_1_1_as_it_comes(tmp_path):
    """CVAT: labelmap.txt (name:R,G,B::), colour masks in SegmentationClass/, SegmentationObject/, default.txt."""
    root = tmp_path / "cvat"
    names = []
    for index in range(7):
        name = f"frame_{index:06d}"
        names.append(name)
        save(str(root / "JPEGImages" / f"{name}.png"), image_of(index))
        save(str(root / "SegmentationClass" / f"{name}.png"), np.array(COLOURS, np.uint8)[classes_of(index)])
        save(str(root / "SegmentationObject" / f"{name}.png"), np.array(COLOURS, np.uint8)[classes_of(index)])
    os.makedirs(root / "ImageSets" / "Segmentation")
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(names) + "\n")
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:250,10,10::\n"
                                       "dog:10,10,250::\n")
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["background", "cat", "dog"] and d.colours == {c: i for i, c in enumerate(COLOURS)}
    mask = common.SegmentationDataset(d, [names[1]])[0][1]
    assert np.array_equal(mask.numpy(), classes_of(1))
    palette = Image.open(tmp_path / "p1" / "masks" / f"{d.train_ids[0]}.png").getpalette()
    assert palette[3:9] == [250, 10, 10, 10, 10, 250]  # the pseudo-masks in the user's colours


def test_kaggle_binary_masks_with_a_mask_suffix_and_capital_extensions_as_they_come(tmp_path):
    """images/x.JPG, masks/x_mask.PNG of 0 and 255, no class list: background and foreground, and the
    pseudo-masks and predictions come back black and white."""
    root = tmp_path / "kaggle"
    for index in range(8):
        save(str(root / "images" / f"case{index}.JPG"), image_of(index))
        if index < 6:
            save(str(root / "masks" / f"case{index}_mask.PNG"), np.where(classes_of(index) == 1, 255, 0).astype(np.uint8))
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["background", "foreground"] and sum(bool(m) for m in d.masks.values()) == 6
    assert np.array_equal(common.SegmentationDataset(d, ["case0"])[0][1].numpy(), (classes_of(0) == 1).astype(int))
    pseudo = Image.open(tmp_path / "p1" / "masks" / "case7.png")
    assert pseudo.getpalette()[:6] == [0, 0, 0, 255, 255, 255]  # a viewer shows 0/255, as the masks were given
    assert set(np.array(pseudo.convert("L")).ravel()) <= {0, 255}


def test_voc_where_only_some_training_images_have_masks(voc_root, tmp_path):
    os.makedirs(os.path.join(voc_root, "ImageSets", "SegmentationAug"))
    with open(os.path.join(voc_root, "ImageSets", "SegmentationAug", "train_aug.txt"), "w") as f:
        f.writelines(f"2007_{i:06d}\n" for i in range(1, 13))
    for image_id in ["2007_000001", "2007_000002", "2007_000003"]:  # in VOC's train.txt, their masks gone
        for folder in ["SegmentationClass", "SegmentationClassAug"]:
            path = os.path.join(voc_root, folder, f"{image_id}.png")
            if os.path.exists(path):
                os.remove(path)
    d = common.describe_dataset(voc_root)
    assert len(d.pool) == 5 and all(d.masks[i] for i in d.pool)
    result = run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 5, *TINY_TRAIN, "--out", tmp_path / "s")
    assert "12 training images (9 with a mask, 3 without)" in result.stdout.splitlines()[0]
    assert_user_error(run_script("stage1_train.py", "--data-root", voc_root, "--labeled", 6, *TINY_TRAIN,
                                 "--out", tmp_path / "t", check=False), "draws from the 5 training images with a mask")


# ----------------------------------------------------------------------------- one prepare_data.py command

def test_roboflow_semantic_masks_after_one_command(tmp_path):
    source = tmp_path / "roboflow"
    for split, count in [("train", 6), ("valid", 2), ("test", 2)]:
        for index in range(count):
            name = f"{split}{index}_jpg.rf.0a1b2c"
            save(str(source / split / f"{name}.jpg"), image_of(index))
            save(str(source / split / f"{name}_mask.png"), classes_of(index))
        (source / split / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, cat\n2, dog\n")
    (source / "README.roboflow.txt").write_text("exported")
    root, said = prepare(source, tmp_path / "data")
    assert "left out: test/ (a test set)" in said
    assert (root / "classes.txt").read_text() == "background = 0\ncat = 1\ndog = 2\n"
    d, val, stats = run_scripts(root, tmp_path)
    assert sorted(d.val_ids) == ["valid/valid0_jpg.rf.0a1b2c", "valid/valid1_jpg.rf.0a1b2c"] and len(d.train_ids) == 6
    assert os.stat(root / "images" / "train" / "train0_jpg.rf.0a1b2c.jpg").st_ino == os.stat(
        source / "train" / "train0_jpg.rf.0a1b2c.jpg").st_ino  # linked, not copied


def test_kaggle_jpeg_masks_are_named_and_thresholded_after_one_command(tmp_path):
    source = tmp_path / "kaggle"
    os.makedirs(source / "masks")
    for index in range(6):
        save(str(source / "images" / f"{index}.jpg"), image_of(index))
        binary = np.where(classes_of(index) == 1, 255, 0).astype(np.uint8)
        Image.fromarray(binary).save(source / "masks" / f"{index}_mask.jpg", quality=75)
    result = run_script("stage1_train.py", "--data-root", source, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "x",
                        check=False)
    assert_user_error(result, "is a JPEG, which changes a mask's values at edges", f"prepare_data.py {source}")
    root, said = prepare(source, tmp_path / "data")
    assert "thresholded at 127.5 into two values, 0 and 255" in said  # halfway between the two values given
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["background", "foreground"]
    read = common.SegmentationDataset(d, ["0"])[0][1].numpy()
    assert (read == (classes_of(0) == 1)).mean() > 0.99  # JPEG may have moved an edge pixel


def test_jpeg_masks_of_more_than_two_classes_are_refused(tmp_path):
    source = tmp_path / "jpeg"
    for index in range(4):
        save(str(source / "images" / f"{index}.jpg"), image_of(index))
        save(str(source / "masks" / f"{index}.jpg"), (classes_of(index) * 100).astype(np.uint8))
    assert_user_error(run_script("prepare_data.py", source, "--out", tmp_path / "out", check=False),
                      "do not hold two classes", "export the masks again as PNG")


def test_oxford_pet_trimaps_after_one_command_values_mapped_not_rewritten(tmp_path):
    source = tmp_path / "oxford-iiit-pet"
    names = [f"Abyssinian_{i}" for i in range(1, 9)]
    for index, name in enumerate(names):
        save(str(source / "images" / f"{name}.jpg"), image_of(index))
        trimap = np.full(SIZE, 2, np.uint8)  # background
        trimap[5:20, 8:30], trimap[4, 8:30] = 1, 3  # the pet, a border
        save(str(source / "annotations" / "trimaps" / f"{name}.png"), trimap)
    (source / "annotations" / "test.txt").write_text(f"{names[-1]} 1 1 1\n{names[-2]} 1 1 1\n")
    (source / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[:-2]))
    root, said = prepare(source, tmp_path / "data")
    assert (root / "classes.txt").read_text() == "background = 2\npet = 1\n__ignore__ = 3\n"
    assert os.stat(root / "masks" / f"{names[0]}.png").st_ino == os.stat(
        source / "annotations" / "trimaps" / f"{names[0]}.png").st_ino
    d, val, stats = run_scripts(root, tmp_path)
    assert d.class_names == ["background", "pet"] and d.val_ids == sorted(names[-2:])
    mask = common.SegmentationDataset(d, [names[0]])[0][1].numpy()
    assert mask[10, 10] == 1 and mask[0, 0] == 0 and mask[4, 10] == 255


def test_coco_polygons_and_rle_after_one_command(tmp_path):
    source = tmp_path / "coco"
    images, annotations = [], []
    for index in range(8):
        save(str(source / "train" / f"img{index}.jpg"), image_of(index))
        images.append({"id": index + 10, "file_name": f"img{index}.jpg", "height": SIZE[0], "width": SIZE[1]})
        annotations.append({"id": len(annotations), "image_id": index + 10, "category_id": 3, "iscrowd": 0,
                            "segmentation": [[5, 4, 20, 4, 20, 14, 5, 14]]})  # a box of "cat"
        annotations.append({"id": len(annotations), "image_id": index + 10, "category_id": 7, "iscrowd": 1,
                            "segmentation": {"size": list(SIZE), "counts": [SIZE[0] * 30 + 22, 8, 24, 8, SIZE[0] * SIZE[1]
                                                                            - SIZE[0] * 30 - 62]}})  # "dog", as RLE
        if index == 0:  # a dog over part of the cat: their overlap is ignored
            annotations.append({"id": len(annotations), "image_id": 10, "category_id": 7, "iscrowd": 0,
                                "segmentation": [[15, 10, 25, 10, 25, 20, 15, 20]]})
    (source / "train" / "_annotations.coco.json").write_text(json.dumps({
        "info": {}, "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}], "images": images,
        "annotations": annotations}))
    save(str(source / "train" / "unannotated.jpg"), image_of(9))
    for split in ["valid", "test"]:  # Roboflow's COCO export: a JSON in each split's folder
        save(str(source / split / f"{split}0.jpg"), image_of(10))
        (source / split / "_annotations.coco.json").write_text(json.dumps({
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}], "annotations": [{
                "id": 0, "image_id": 0, "category_id": 3, "segmentation": [[1, 1, 30, 1, 30, 20, 1, 20]]}],
            "images": [{"id": 0, "file_name": f"{split}0.jpg", "height": SIZE[0], "width": SIZE[1]}]}))
    root, said = prepare(source, tmp_path / "data")
    assert "left out: the 1 images of" in said and (root / "val.txt").read_text() == "valid/valid0\n"
    assert (root / "classes.txt").read_text() == "background\ncat\ndog\n"
    mask = np.array(Image.open(root / "masks" / "train" / "img0.png"))
    assert mask[8, 10] == 1 and mask[0, 0] == 0 and mask[22, 30] == 2 and mask[29, 31] == 2 and mask[30, 31] == 0
    assert mask[12, 17] == 255 and mask[17, 22] == 2  # the overlap, and the dog alone
    d, val, stats = run_scripts(root, tmp_path)
    assert not d.masks["train/unannotated"] and len(d.train_ids) == 9 and d.val_ids == ["valid/valid0"]


# ----------------------------------------------------------------------------- class lists, checked

def own_layout(root, classes_txt, masks=lambda index: classes_of(index), count=6):
    for index in range(count):
        save(str(root / "images" / f"{index}.jpg"), image_of(index))
        save(str(root / "masks" / f"{index}.png"), masks(index))
    (root / "classes.txt").write_text(classes_txt)
    return root


@pytest.mark.parametrize("classes_txt,fragment", [
    ("background\ncat\ncat\n", "classes.txt line 3: 'cat' is listed twice (first on line 2)"),
    ("background\n\ncat\n = 4\n", "classes.txt line 4: a name is missing"),
    ("id,name\n0,background\n1,cat\n2,dog\n", "classes.txt line 1: 'id,name' is a table's row"),
    ("background = 0\ncat = 1\ndog\n", "classes.txt line 3: give every class its values in the masks after '='"),
    ("background = 0\ncat = 1\ndog = 1\n", "the mask value 1 is given twice"),
    ("background = 0\ncat = x\n", "classes.txt line 2: 'cat = x': after '=' come the class's values in the masks"),
    ("background\n", "classes.txt line 1: 1 class; background and one more at least are needed"),
])
def test_a_class_list_that_cannot_be_right_is_refused_naming_file_and_line(tmp_path, classes_txt, fragment):
    root = own_layout(tmp_path / "data", classes_txt)
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "r",
                        check=False)
    assert_user_error(result, fragment)


def test_a_header_line_and_value_maps_are_understood_and_said_so(tmp_path):
    root = own_layout(tmp_path / "data", "name\nbackground = 7\ncat = 3\ndog = 5 6\n__ignore__ = 0\n",
                      masks=lambda index: np.array([7, 3, 6], np.uint8)[classes_of(index)] * (np.arange(40) > 0))
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "r")
    assert f"{root}/classes.txt line 1: 'name' read as a header, not a class" in result.stdout
    assert "__ignore__ is no class; the values it counts nowhere: [0, 255]" in result.stdout
    d = common.describe_dataset(str(root))
    mask = common.SegmentationDataset(d, ["1"])[0][1].numpy()
    assert np.array_equal(mask[:, 1:], classes_of(1)[:, 1:]) and (mask[:, 0] == 255).all()  # 0 ignored
    own_layout(tmp_path / "data", "background = 7\ncat = 3\ndog = 5\n", masks=lambda index: np.full(SIZE, 6, np.uint8))
    assert_user_error(run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out",
                                 tmp_path / "r2", check=False), "has the value 6, which is no class's")


def test_the_start_of_a_run_stays_readable_with_150_classes(tmp_path):
    names = ["background"] + [f"class number {i}" for i in range(1, 150)]
    root = own_layout(tmp_path / "data", "".join(f"{n}\n" for n in names),
                      masks=lambda index: ((np.arange(SIZE[0] * SIZE[1]).reshape(SIZE) + index) % 150).astype(np.uint8))
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--iters", 1,
                        "--out", tmp_path / "r")
    start = result.stdout.split("1 steps of")[0]
    assert "class number 149" in start and "ignored (255): 0.0%" in start
    assert max(len(line) for line in start.splitlines()[1:]) <= 120


def test_the_images_to_label_next_are_ranked_by_the_models_uncertainty(tmp_path):
    root = tmp_path / "data"
    own_layout(root, "background\ncat\ndog\n")
    for index in range(6, 12):  # unlabelled photos
        save(str(root / "images" / f"{index}.jpg"), image_of(index))
    d, _, stats = run_scripts(root, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "p1" / "label_next.csv")))
    assert [r["id"] for r in rows] and {r["id"] for r in rows} == {str(i) for i in range(6, 12)}  # those without a mask
    margins = [float(r["mean_margin"]) for r in rows]
    assert margins == sorted(margins) and [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert stats["label_next"]["ranked_by"].startswith("mean margin p1 - p2") and "smallest first" in (
        stats["label_next"]["ranked_by"])
    assert list(rows[0])[:4] == ["rank", "id", "mean_margin", "mean_entropy"]  # the score it ranks by, first
    assert Image.open(tmp_path / "p1" / "label_next.png").size[0] == 4 * 164 + 4


def test_two_images_of_one_name_are_refused_not_one_dropped(tmp_path):
    source = tmp_path / "oxford-iiit-pet"
    for name in ["Bengal_1.jpg", "Bengal_1.png"]:
        save(str(source / "images" / name), image_of(0))
    save(str(source / "annotations" / "trimaps" / "Bengal_1.png"), np.full(SIZE, 2, np.uint8))
    assert_user_error(run_script("prepare_data.py", source, "--out", tmp_path / "out", check=False),
                      "Bengal_1.jpg and", "Bengal_1.png have the same id Bengal_1; rename one of them")
    assert not (tmp_path / "out").exists()
