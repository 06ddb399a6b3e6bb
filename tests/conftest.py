"""A tiny VOC-shaped folder tree written by the tests, and a helper to run the scripts as a user does."""
import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import outputs  # noqa: E402

# 12 training images (the first 8 are VOC's train.txt), 4 val images, in three sizes.
TRAIN_IDS = [f"2007_{i:06d}" for i in range(1, 13)]
VOC_TRAIN_IDS = TRAIN_IDS[:8]
VAL_IDS = [f"2008_{i:06d}" for i in range(1, 5)]
SIZES = [(40, 30), (30, 40), (36, 36)]  # (width, height)


def image_size(index):
    return SIZES[index % len(SIZES)]


def make_mask(index, num_classes=21):
    """A background mask with one class rectangle and a 255 border, as VOC's are."""
    width, height = image_size(index)
    mask = np.zeros((height, width), dtype=np.uint8)
    label = 1 + index % (num_classes - 1)
    mask[5:height - 8, 6:width - 10] = IGNORE_BORDER
    mask[6:height - 9, 7:width - 11] = label
    return mask


IGNORE_BORDER = 255


def make_image(index):
    rng = np.random.default_rng(index)
    width, height = image_size(index)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_voc_tree(root, with_aug=True, train_aug_list=False):
    """JPEGImages, SegmentationClass (palette PNGs: VOC train and val ids), SegmentationClassAug
    (single-channel PNGs: all training ids and, as the real SBD folder, the val ids too), split files."""
    for folder in ["JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"]:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    palette = common.colour_palette()
    for index, image_id in enumerate(TRAIN_IDS + VAL_IDS):
        Image.fromarray(make_image(index)).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=95)
        mask = make_mask(index)
        if image_id in VOC_TRAIN_IDS or image_id in VAL_IDS:
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(os.path.join(root, "SegmentationClass", f"{image_id}.png"))
        if with_aug:
            Image.fromarray(mask, mode="L").save(os.path.join(root, "SegmentationClassAug", f"{image_id}.png"))
    if not with_aug:
        os.rmdir(os.path.join(root, "SegmentationClassAug"))
    with open(os.path.join(root, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in VOC_TRAIN_IDS)
    with open(os.path.join(root, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in VAL_IDS)
    if train_aug_list:
        os.makedirs(os.path.join(root, "ImageSets/SegmentationAug"), exist_ok=True)
        with open(os.path.join(root, "ImageSets/SegmentationAug/train_aug.txt"), "w") as f:
            f.writelines(f"{i}\n" for i in TRAIN_IDS[:10])
    return root


@pytest.fixture(scope="session")
def voc_template(tmp_path_factory):
    return write_voc_tree(str(tmp_path_factory.mktemp("voc_template") / "VOC2012"))


@pytest.fixture
def voc_root(voc_template, tmp_path):
    """A fresh copy of the tiny VOC tree that a test may change."""
    return shutil.copytree(voc_template, str(tmp_path / "VOC2012"))


# The smallest settings that run the real scripts end to end on the CPU in seconds.
TINY_TRAIN = ["--backbone", "tiny_unet", "--no-pretrained", "--crop-size", "24", "--batch-size", "2",
              "--iters", "2", "--workers", "0", "--device", "cpu", "--print-every", "1"]


@pytest.fixture(scope="module")
def pseudo_masks(voc_template, tmp_path_factory):
    """A stage-1 run on the tiny VOC tree (s1) and its pseudo-masks (p1)."""
    base = tmp_path_factory.mktemp("runs")
    run_script("stage1_train.py", "--data-root", voc_template, "--labeled", 4, *TINY_TRAIN, "--out", base / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", base / "s1", "--out", base / "p1", "--workers", 0)
    return base


def run_script(script, *args, check=True, subprocess_run=False):
    """Run a script as a user does; returns a CompletedProcess (stdout and stderr as text).

    In-process by default (the script's main() under outputs.run_main, as its __main__ does), which
    spares each call the seconds of importing torch; subprocess_run=True starts a real process."""
    argv = [str(a) for a in args]
    if subprocess_run:
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv],
                                capture_output=True, text=True, cwd=ROOT, timeout=600)
    else:
        module = importlib.import_module(os.path.splitext(script)[0])
        stdout, stderr, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), working_directory(ROOT):
            try:
                outputs.run_main(lambda: module.main(argv))
            except SystemExit as e:
                if isinstance(e.code, str):
                    stderr.write(e.code + "\n")
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                stderr.write(traceback.format_exc())
                code = 1
        result = subprocess.CompletedProcess([script, *argv], code, stdout.getvalue(), stderr.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def assert_user_error(result, *fragments):
    """One clear line on stderr, a non-zero exit, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# A tiny Cityscapes tree: leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png and gtFine's masks.
CS_TRAIN = {"aachen": [f"aachen_{i:06d}_000019" for i in range(5)], "bochum": [f"bochum_{i:06d}_000019" for i in range(4)]}
CS_VAL = {"frankfurt": [f"frankfurt_{i:06d}_000019" for i in range(3)]}
CS_SIZE = (32, 48)  # (height, width)
# Raw label ids and the train ids they map to: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, person 24 -> 11,
# car 26 -> 13; unlabeled 0, ego vehicle 1, parking 9 (not a training class) -> 255.
CS_RAW_TO_TRAIN = {7: 0, 8: 1, 11: 2, 24: 11, 26: 13, 0: 255, 1: 255, 9: 255}


def cityscapes_raw_mask(index):
    height, width = CS_SIZE
    raw = np.full((height, width), 11, dtype=np.uint8)  # building on top
    raw[height // 2:] = 7  # road below
    raw[height // 2:, :8] = 8  # a sidewalk
    raw[8:14, 10 + index % 5:20 + index % 5] = 26  # a car that moves
    raw[4:8, 30:34] = 24
    raw[20:24, 36:44] = 9  # parking: ignored
    raw[0, :] = 0
    raw[-4:, 12:36] = 1  # the ego vehicle's bonnet, at the bottom of every frame
    return raw


def write_cityscapes_tree(root, kinds=("labelIds",)):
    rng = np.random.default_rng(0)
    index = 0
    for split, cities in [("train", CS_TRAIN), ("val", CS_VAL)]:
        for city, ids in cities.items():
            os.makedirs(os.path.join(root, "leftImg8bit", split, city), exist_ok=True)
            os.makedirs(os.path.join(root, "gtFine", split, city), exist_ok=True)
            for image_id in ids:
                image = rng.integers(0, 256, size=(*CS_SIZE, 3), dtype=np.uint8)
                Image.fromarray(image).save(os.path.join(root, "leftImg8bit", split, city, f"{image_id}_leftImg8bit.png"))
                raw = cityscapes_raw_mask(index)
                train = np.vectorize(CS_RAW_TO_TRAIN.get)(raw).astype(np.uint8)
                for kind, mask in [("labelIds", raw), ("labelTrainIds", train)]:
                    if kind in kinds:
                        Image.fromarray(mask, mode="L").save(os.path.join(root, "gtFine", split, city, f"{image_id}_gtFine_{kind}.png"))
                index += 1
    return root


@pytest.fixture(scope="session")
def cityscapes_template(tmp_path_factory):
    return write_cityscapes_tree(str(tmp_path_factory.mktemp("cityscapes_template") / "cityscapes"))


@pytest.fixture
def cityscapes_root(cityscapes_template, tmp_path):
    return shutil.copytree(cityscapes_template, str(tmp_path / "cityscapes"))
