"""Your own data: a folder of images, some with masks, and classes.txt. The layout, every form of
mask people store (class indices, palette PNGs, colour masks, binary 0/255 masks), every refusal,
what a training run says at its start, and the scripts on it."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import outputs
import stage1_train
from conftest import TINY_TRAIN, assert_user_error, run_script

COLOURS = {0: (0, 0, 0), 1: (250, 10, 10), 2: (10, 10, 250)}


def labels(index, size=(20, 24)):
    """Background with a square of class 1 and, in every other image, a bar of class 2."""
    mask = np.zeros(size, np.uint8)
    mask[3:10, 4 + index % 5:12 + index % 5] = 1
    if index % 2:
        mask[14:17, 2:20] = 2
    return mask


def write_own_data(root, form="index", count=10, masked=6, classes_txt="background\ncat\ndog\n", extension=".jpg"):
    """images/ (some nested), masks/ for the first `masked` images in the given form, classes.txt."""
    rng = np.random.default_rng(0)
    ids = [f"shoot{i % 2}/img{i:02d}" if i % 3 else f"img{i:02d}" for i in range(count)]
    for index, image_id in enumerate(ids):
        for folder in ["images", "masks"]:
            os.makedirs(os.path.dirname(os.path.join(root, folder, image_id)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(root, "images", image_id + extension))
        if index >= masked:
            continue
        mask, path = labels(index), os.path.join(root, "masks", f"{image_id}.png")
        if form == "index":
            Image.fromarray(mask, mode="L").save(path)
        elif form == "palette":
            png = Image.fromarray(mask, mode="P")
            png.putpalette(common.colour_palette())
            png.save(path)
        elif form == "colour":
            Image.fromarray(np.array([COLOURS[c] for c in range(3)], np.uint8)[mask]).save(path)
        elif form in ("binary", "binary grey rgb"):
            binary = np.where(mask == 1, 255, 0).astype(np.uint8)
            Image.fromarray(binary if form == "binary" else np.stack([binary] * 3, -1)).save(path)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write(classes_txt)
    return ids


@pytest.fixture
def own_root(tmp_path):
    root = str(tmp_path / "mydata")
    write_own_data(root)
    return root


def test_the_layout_is_recognised(own_root):
    d = common.describe_dataset(own_root)
    ids = sorted(write_own_data(own_root))
    assert d.kind == "folder" and sorted(d.images) == ids and d.class_names == ["background", "cat", "dog"]
    assert "shoot1/img01" in d.images and d.images["shoot1/img01"].endswith(os.path.join("images", "shoot1", "img01.jpg"))
    masked = sorted(i for i in ids if int(i[-2:]) < 6)
    assert sorted(i for i, path in d.masks.items() if path) == masked
    assert len(d.val_ids) == 1 and set(d.val_ids) <= set(masked)  # a seeded fifth of the six masked images
    assert d.val_ids == common.describe_dataset(own_root).val_ids  # the same every time
    assert sorted(d.train_ids) == sorted(set(ids) - set(d.val_ids)) and sorted(d.pool) == sorted(set(masked) - set(d.val_ids))
    assert d.notes == ["masks: 6 of the 10 images have one; the others are unlabelled",
                       "val: 1 of the 6 masked images, a seeded fifth (no val.txt; this run's later stages and labelling "
                       "rounds keep it)",
                       f"classes: from {own_root}/classes.txt"]


def test_val_txt_chooses_the_val_images(own_root):
    with open(os.path.join(own_root, "val.txt"), "w") as f:
        f.write("img00\nimages/shoot1/img01.jpg\n")  # an id, or the image's path
    assert common.describe_dataset(own_root).val_ids == ["img00", "shoot1/img01"]
    with open(os.path.join(own_root, "val.txt"), "a") as f:
        f.write("shoot1/img07\n")
    with pytest.raises(common.UserError, match="val.txt lists shoot1/img07, which has no mask"):
        common.describe_dataset(own_root)
    with open(os.path.join(own_root, "val.txt"), "w") as f:
        f.write("img0\n")  # a typo
    with pytest.raises(common.UserError, match="val.txt lists img0, which is no image of the dataset"):
        common.describe_dataset(own_root)


def test_hidden_files_are_left_alone(own_root):
    """What a desktop leaves in folders (.DS_Store, macOS's ._ files) is neither an image nor a mask."""
    for path in ["images/._img00.jpg", "masks/.DS_Store", "images/shoot1/.thumbnail.png"]:
        with open(os.path.join(own_root, path), "wb") as f:
            f.write(b"not an image")
    assert len(common.describe_dataset(own_root).images) == 10


def test_webp_images_are_read_and_other_files_said_to_be_left_out(own_root):
    Image.open(os.path.join(own_root, "images", "img09.jpg")).save(os.path.join(own_root, "images", "web.webp"))
    for name in ["img09.json", "phone.HEIC"]:  # LabelMe's shapes beside an image; an iPhone photo
        with open(os.path.join(own_root, "images", name), "wb") as f:
            f.write(b"{}")
    d = common.describe_dataset(own_root)
    assert "web" in d.images and common.read_image(d.images["web"]).shape == (3, 20, 24)
    assert "images/: 2 files left out, not images of a kind read here (.heic, .json; images: .jpg .jpeg" in d.notes[0]


def test_a_checkpoint_that_trained_on_val_images_is_refused_on_its_own_data_only(own_root, tmp_path):
    d = common.describe_dataset(own_root)
    other = str(tmp_path / "other")
    write_own_data(other)  # the same ids, other images
    checkpoint = {"class_names": d.class_names, "labeled": d.val_ids, "unlabeled": [], "args": {"data_root": other}}
    common.check_checkpoint_fits(checkpoint, "other.pt", d)
    checkpoint["args"]["data_root"] = own_root
    with pytest.raises(common.UserError, match=f"of own.pt's training are val images of {own_root} now"):
        common.check_checkpoint_fits(checkpoint, "own.pt", d)


def test_hidden_folders_are_left_out_and_linked_folders_read_once(own_root, tmp_path):
    """Jupyter's .ipynb_checkpoints/ holds copies, not images of the data; a folder linked in (data on another disk)
    is read, and a link back up is no loop."""
    checkpoints = os.path.join(own_root, "images", ".ipynb_checkpoints")
    os.makedirs(checkpoints)
    shutil.copy(os.path.join(own_root, "images", "img00.jpg"), os.path.join(checkpoints, "img00-checkpoint.jpg"))
    elsewhere = tmp_path / "other_disk" / "batch2"
    os.makedirs(elsewhere)
    shutil.copy(os.path.join(own_root, "images", "img00.jpg"), elsewhere / "b0.jpg")
    os.symlink(elsewhere, os.path.join(own_root, "images", "batch2"))
    os.symlink(os.path.join(own_root, "images"), elsewhere / "back")  # a loop
    images = common.describe_dataset(own_root).images
    assert len(images) == 11 and "batch2/b0" in images and not any("ipynb" in i or "back" in i for i in images)


@pytest.mark.parametrize("form,classes_txt", [
    ("index", "background\ncat\ndog\n"),
    ("palette", "background\ncat\ndog\n"),
    ("colour", "background 0 0 0\ncat 250 10 10\ndog #0a0afa\n"),
])
def test_every_mask_form_reads_as_the_same_classes(tmp_path, form, classes_txt):
    root = str(tmp_path / form)
    ids = write_own_data(root, form=form, classes_txt=classes_txt)
    d = common.describe_dataset(root)
    for index, image_id in enumerate(ids[:6]):
        _, mask, _ = common.SegmentationDataset(d, [image_id])[0]
        assert np.array_equal(mask.numpy(), labels(index)), image_id


@pytest.mark.parametrize("form", ["binary", "binary grey rgb"])
def test_binary_masks_are_background_and_foreground_and_said_so(tmp_path, form):
    root = str(tmp_path / "binary")
    ids = write_own_data(root, form=form, classes_txt="background\nobject\n")
    d = common.describe_dataset(root)
    _, mask, _ = common.SegmentationDataset(d, [ids[0]])[0]
    assert np.array_equal(mask.numpy(), (labels(0) == 1).astype(np.int64))  # 255 is the object, not "ignore"
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "run")
    assert ("masks: only 0 and 255 with two classes; 255 is the second class, not ignore"
            in result.stdout.splitlines()[:5])


def test_the_start_of_a_run_says_what_the_data_holds(own_root, tmp_path):
    out = tmp_path / "run"
    result = run_script("stage1_train.py", "--data-root", own_root, "--labeled", 2, *TINY_TRAIN, "--split-seed", 1, "--out", out)
    lines = result.stdout.splitlines()
    assert lines[0] == (f"folder data in {own_root}: 9 training images (5 with a mask, 4 without), 1 val images, "
                        "3 classes")
    assert lines[1:4] == ["masks: 6 of the 10 images have one; the others are unlabelled",
                          "val: 1 of the 6 masked images, a seeded fifth (no val.txt; this run's later stages and "
                          "labelling rounds keep it)",
                          f"classes: from {own_root}/classes.txt"]
    assert lines[4] == "this run: 2 labelled and 7 unlabelled training images"
    assert lines[5].startswith("pixels of the 2 labelled masks: background ") and "cat " in lines[5]
    assert lines[6].startswith("pixels of the 1 val masks: background ") and "ignored (255): 0.0%" in lines[6]
    # The val images used are written to the run's folder.
    assert (out / "val.txt").read_text().split() == common.describe_dataset(own_root).val_ids


def test_a_class_without_a_pixel_is_reported(tmp_path):
    root = str(tmp_path / "data")
    write_own_data(root, classes_txt="background\ncat\ndog\nbird\n")
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 5, *TINY_TRAIN, "--out", tmp_path / "run")
    assert "note: the labelled masks have no pixel of bird" in result.stdout


def test_the_split_flags_work_on_it(own_root, tmp_path):
    d = common.describe_dataset(own_root)
    listed = tmp_path / "list.txt"
    labelled = sorted(d.pool)[:2]
    listed.write_text(f"images/{labelled[0]}.jpg masks/{labelled[0]}.png\n{labelled[1]}\n")
    args = argparse.Namespace(labeled=None, protocol="classic", split_seed=0, labeled_list=str(listed), unlabeled_list=None, add_labeled=None)
    labeled, unlabeled, _ = stage1_train.make_split(d, args)
    assert labeled == labelled and sorted(labeled + unlabeled) == d.train_ids
    args = argparse.Namespace(labeled=6, protocol="classic", split_seed=0, labeled_list=None, unlabeled_list=None, add_labeled=None)
    with pytest.raises(common.UserError, match="--labeled 6: the classic protocol draws from the 5 training images "
                                               "with a mask"):
        stage1_train.make_split(d, args)


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("damage,fragment", [
    ("a value that is no class", "has the value 7, neither a class (0-2) nor 255 (ignore)"),
    ("an unknown colour", "has the colour 1 2 3, no class's in classes.txt"),
    ("a colour mask without colours", "is a colour image; give every class its colour in classes.txt"),
    ("a mask without an image", "masks/ghost.png: a mask must be masks/<id>.png (or <id>_mask.png) for an image"),
    ("a JPEG mask", "masks/img04.jpg is a JPEG, which changes a mask's values at edges; save the masks as PNG, or "
                    "let prepare_data.py"),
    ("two images with one id", "have the same id img00"),
    ("no classes.txt", "has no class list and its masks hold the values 0, 1, 2; name the classes in classes.txt"),
    ("a colour for some classes only", "give every class a colour of its own"),
    ("every masked image in val", "draws from the 0 training images with a mask; every masked image is in val: list "
                                  "fewer in val.txt"),
])
def test_refusals_name_the_file_and_what_is_wrong(tmp_path, damage, fragment):
    root = str(tmp_path / "data")
    form = "colour" if damage == "an unknown colour" else "index"
    write_own_data(root, form=form, classes_txt="background 0 0 0\ncat 250 10 10\ndog 10 10 250\n" if form == "colour"
                   else "background\ncat\ndog\n")
    mask_path = os.path.join(root, "masks", "img03.png")
    if damage == "a value that is no class":
        write(mask_path, np.full((20, 24), 7, np.uint8))
    elif damage == "an unknown colour":
        write(mask_path, np.tile(np.array([1, 2, 3], np.uint8), (20, 24, 1)))
    elif damage == "a colour mask without colours":
        write(mask_path, np.tile(np.array([200, 0, 0], np.uint8), (20, 24, 1)))
    elif damage == "a mask without an image":
        write(os.path.join(root, "masks", "ghost.png"), np.zeros((20, 24), np.uint8))
    elif damage == "a JPEG mask":
        write(os.path.join(root, "masks", "img04.jpg"), np.zeros((20, 24), np.uint8))
    elif damage == "two images with one id":
        write(os.path.join(root, "images", "img00.png"), np.zeros((20, 24, 3), np.uint8))
    elif damage == "no classes.txt":
        os.remove(os.path.join(root, "classes.txt"))
    elif damage == "a colour for some classes only":
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("background 0 0 0\ncat\ndog\n")
    elif damage == "every masked image in val":
        with open(os.path.join(root, "val.txt"), "w") as f:
            f.write("".join(f"{os.path.relpath(path, os.path.join(root, 'masks'))[:-4]}\n"
                            for path in common.list_images(os.path.join(root, "masks"), extensions=".png")))
    result = run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "run",
                        check=False)
    assert_user_error(result, fragment)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_every_script_runs_on_it_with_png_images(tmp_path):
    root = str(tmp_path / "data")
    ids = write_own_data(root, extension=".png")
    run_script("stage1_train.py", "--data-root", root, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0)
    train_ids = common.describe_dataset(root).train_ids
    for image_id in train_ids:  # nested ids keep their folders
        assert Image.open(tmp_path / "p1" / "masks" / f"{image_id}.png").size == (24, 20)
    stats = json.load(open(tmp_path / "p1" / "stats.json"))
    assert stats["unlabeled"]["images"] == 7 and stats["unlabeled"]["images_with_truth"] == 3  # 4 have no mask
    run_script("stage3_multitask.py", "--pseudo", tmp_path / "p1", "--backbone", "tiny_unet", "--no-pretrained",
               "--crop-size", 16, "--batch-labeled", 1, "--batch-unlabeled", 2, "--iters", 2, "--workers", 0, "--device", "cpu",
               "--out", tmp_path / "s2")
    run_script("evaluate.py", "--checkpoint", tmp_path / "s2", "--images", os.path.join(root, "images"),
               "--save-dir", tmp_path / "pred", "--workers", 0)
    assert os.path.exists(tmp_path / "pred" / f"{ids[1]}.png") and os.path.exists(tmp_path / "pred" / f"{ids[1]}_overlay.jpg")
    palette = Image.open(tmp_path / "pred" / f"{ids[1]}.png").getpalette()[:9]
    assert palette == list(common.colour_palette()[:9])  # no colours in classes.txt: VOC's
    checkpoint, _ = outputs.load_checkpoint(str(tmp_path / "s2"))
    assert checkpoint["class_names"] == ["background", "cat", "dog"] and torch.is_tensor(checkpoint["model"]["head.3.weight"])


def test_pseudo_masks_of_another_dataset_with_the_same_ids_are_refused(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    write_own_data(first)
    write_own_data(second)  # the same ids and classes, another folder
    run_script("stage1_train.py", "--data-root", first, "--labeled", 2, *TINY_TRAIN, "--out", tmp_path / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0)
    result = run_script("stage3_multitask.py", "--pseudo", tmp_path / "p1", "--data-root", second, "--backbone", "tiny_unet",
                        "--no-pretrained", "--crop-size", 16, "--iters", 1, "--workers", 0, "--out", tmp_path / "s2", check=False)
    assert_user_error(result, f"--pseudo {tmp_path / 'p1'} was made on the data in {os.path.realpath(first)}, not on "
                              f"--data-root {second}")
