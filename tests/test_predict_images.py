"""evaluate.py --images: predictions on a folder of one's own images, one output per input, each
image read as an image viewer shows it, and an image that cannot be predicted skipped and named."""
import os

import numpy as np
import pytest
from PIL import Image

import common
from conftest import TINY_TRAIN, assert_user_error, run_script


@pytest.fixture(scope="module")
def checkpoint(voc_template, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("predict") / "stage1")
    run_script("stage1_train.py", "--data-root", voc_template, "--labeled", 4, *TINY_TRAIN, "--out", out)
    return out


def predict(checkpoint, images, save, check=True):
    return run_script("evaluate.py", "--checkpoint", checkpoint, "--images", images, "--save-dir", save, "--workers", 0,
                      check=check)


def test_predictions_on_a_folder_of_images(checkpoint, tmp_path):
    images = tmp_path / "photos"
    (images / "holiday").mkdir(parents=True)
    Image.fromarray(np.zeros((21, 34, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.full((17, 23, 3), 200, np.uint8)).save(images / "holiday" / "b.PNG")
    Image.fromarray(np.full((19, 22, 3), 90, np.uint8)).save(images / "c.bmp")
    (images / "notes.txt").write_text("not an image")
    save = tmp_path / "pred"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--images", images, "--save-dir", save,
                        "--flip", "--scales", 0.75, 1)
    assert "predicted 3 of 3 images" in result.stdout
    assert Image.open(save / "a.png").size == (34, 21) and Image.open(save / "a.png").mode == "P"
    assert Image.open(save / "holiday" / "b.png").size == (23, 17)
    overlay = Image.open(save / "holiday" / "b_overlay.jpg")  # the image, and a legend of its classes below
    assert overlay.size[0] == 320 and overlay.size[1] > 17
    assert Image.open(save / "c.png").size == (22, 19)
    # An unreadable image and one too small for the model: named and skipped, the others still written,
    # a non-zero exit at the end. The same command into the same folder writes the predictions again.
    (images / "broken.jpg").write_bytes(b"garbage")
    Image.fromarray(np.zeros((5, 40, 3), np.uint8)).save(images / "sliver.png")
    os.remove(save / "a.png")
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--images", images, "--save-dir", save,
                        "--flip", "--scales", 0.75, 1, check=False)
    assert result.returncode != 0 and "broken.jpg" in result.stderr and "sliver.png is 40x5: too small" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: 2 of 5 images of {images} could not be predicted (named above)"
    assert os.path.exists(save / "a.png")


def test_two_images_never_share_an_output_name(checkpoint, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.full((24, 24, 3), 255, np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "b.jpg")
    predict(checkpoint, images, tmp_path / "pred")
    assert sorted(os.listdir(tmp_path / "pred")) == ["a.jpg.png", "a.jpg_overlay.jpg", "a.png.png", "a.png_overlay.jpg",
                                                     "b.png", "b_overlay.jpg", "run.json"]
    assert Image.open(tmp_path / "pred" / "a.jpg.png").size == (30, 20) and Image.open(tmp_path / "pred" / "a.png.png").size == (24, 24)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation (phones), 16-bit grey, transparency, palette and CMYK files."""
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10] = 255  # the left third white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer turns it 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    image = common.read_image(str(tmp_path / "phone.jpg"))
    assert image.shape == (3, 30, 10) and image[:, :10].float().mean() > 200 and image[:, -10:].float().mean() < 50
    Image.fromarray(np.full((8, 9), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert (common.read_image(str(tmp_path / "deep.png")) == 255).all()  # 16-bit white stays white
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255  # the left part opaque red, the rest transparent
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    image = common.read_image(str(tmp_path / "cutout.png"))
    assert image[:, 0, 0].tolist() == [255, 0, 0] and image[:, 0, -1].tolist() == [255, 255, 255]  # over white
    Image.fromarray(np.full((8, 9, 3), 40, np.uint8)).convert("CMYK").save(tmp_path / "print.jpg")
    assert common.read_image(str(tmp_path / "print.jpg")).shape == (3, 8, 9)


def test_one_image_file_is_predicted_too(checkpoint, tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "photos" / "photo.jpg")
    result = predict(checkpoint, tmp_path / "photos" / "photo.jpg", tmp_path / "out")
    assert "predicted 1 of 1 images" in result.stdout
    assert Image.open(tmp_path / "out" / "photo.png").size == (30, 20)


def test_predictions_bad_inputs(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(predict(checkpoint, tmp_path / "empty", tmp_path / "p", check=False), "holds no image")
    assert_user_error(run_script("evaluate.py", "--checkpoint", checkpoint, "--images", tmp_path / "empty", check=False),
                      "--images needs --save-dir")
    assert_user_error(predict(checkpoint, tmp_path / "nowhere", tmp_path / "p", check=False), "--images", "not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(predict(junk, tmp_path / "empty", tmp_path / "p", check=False), "is not a checkpoint of this project")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "a.jpg")
    assert_user_error(predict(checkpoint, photos, photos / "predictions", check=False),  # never into the images read
                      f"--save-dir {photos / 'predictions'} is inside {photos}")
    assert os.listdir(photos) == ["a.jpg"]
