"""The VOC loader and the split protocols, on the tiny tree of conftest.py."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import TRAIN_IDS, VAL_IDS, VOC_TRAIN_IDS, make_mask, write_voc_tree


def test_training_ids_come_from_the_aug_folder_minus_val(voc_root):
    # SegmentationClassAug also holds the val masks, as the real SBD folder does: they must not train.
    assert common.training_ids(voc_root) == TRAIN_IDS


def test_training_ids_prefer_train_aug_txt(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), train_aug_list=True)
    assert common.training_ids(root) == TRAIN_IDS[:10]


def test_training_ids_fall_back_to_voc_train_txt(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), with_aug=False)
    assert common.training_ids(root) == VOC_TRAIN_IDS
    labeled, unlabeled = common.make_split(root, 3)
    assert len(labeled) == 3 and sorted(labeled + unlabeled) == VOC_TRAIN_IDS


def test_classic_protocol_draws_from_voc_train_and_leaves_the_rest_unlabelled(voc_root):
    labeled, unlabeled = common.make_split(voc_root, 5, "classic", seed=0)
    assert len(labeled) == 5 and set(labeled) <= set(VOC_TRAIN_IDS)
    assert sorted(labeled + unlabeled) == TRAIN_IDS and not set(labeled) & set(unlabeled)
    assert not set(unlabeled) & set(VAL_IDS)


def test_blended_protocol_draws_from_all_training_ids(voc_root):
    draws = {tuple(common.make_split(voc_root, 10, "blended", seed=s)[0]) for s in range(5)}
    assert any(set(d) - set(VOC_TRAIN_IDS) for d in draws)  # reaches beyond train.txt
    assert all(len(d) == 10 for d in draws)


def test_split_is_deterministic_in_its_seed(voc_root):
    assert common.make_split(voc_root, 4, seed=1) == common.make_split(voc_root, 4, seed=1)
    assert len({tuple(common.make_split(voc_root, 4, seed=s)[0]) for s in range(6)}) > 1


@pytest.mark.parametrize("labeled", [0, -3, 9])
def test_labeled_count_outside_the_protocol_is_refused(voc_root, labeled):
    with pytest.raises(common.UserError, match="--labeled"):
        common.make_split(voc_root, labeled, "classic")


def test_both_split_file_formats_are_read(voc_root, tmp_path):
    bare = tmp_path / "bare.txt"
    bare.write_text("2007_000002\n2007_000005\n\n")
    paired = tmp_path / "paired.txt"
    paired.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in ["2007_000009", "2007_000003"]))
    assert common.read_id_list(str(bare)) == ["2007_000002", "2007_000005"]
    assert common.read_id_list(str(paired)) == ["2007_000009", "2007_000003"]
    labeled, unlabeled = common.make_split(voc_root, None, labeled_list=str(paired), unlabeled_list=str(bare))
    assert labeled == ["2007_000003", "2007_000009"] and unlabeled == ["2007_000002", "2007_000005"]


def test_split_list_errors(voc_root, tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        common.make_split(voc_root, None, labeled_list=str(tmp_path / "nope.txt"))
    leak = tmp_path / "leak.txt"
    leak.write_text(f"{VAL_IDS[0]}\n")
    with pytest.raises(common.UserError, match="val images"):
        common.make_split(voc_root, None, labeled_list=str(leak))
    ghost = tmp_path / "ghost.txt"
    ghost.write_text("2099_000001\n")
    with pytest.raises(common.UserError, match="has no image"):
        common.make_split(voc_root, None, labeled_list=str(ghost))
    with pytest.raises(common.UserError, match="lists 1 images"):
        common.make_split(voc_root, 3, labeled_list=str(ghost))


def test_unlabelled_images_need_no_mask(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), train_aug_list=True)
    os.remove(os.path.join(root, "SegmentationClassAug", "2007_000010.png"))  # not in train.txt: no mask at all now
    labeled, unlabeled = common.make_split(root, 8, "classic")
    assert "2007_000010" in unlabeled and common.train_mask_path(root, "2007_000010") is None


@pytest.mark.parametrize("image_id,folder", [("2007_000001", "SegmentationClass"), ("2007_000011", "SegmentationClassAug")])
def test_masks_are_class_indices_from_both_kinds_of_png(voc_root, image_id, folder):
    index = (TRAIN_IDS + VAL_IDS).index(image_id)
    expected = make_mask(index)
    if folder == "SegmentationClass":
        os.remove(os.path.join(voc_root, "SegmentationClassAug", f"{image_id}.png"))
    path = common.train_mask_path(voc_root, image_id)
    assert folder in path and Image.open(path).mode == ("P" if folder == "SegmentationClass" else "L")
    dataset = common.SegmentationDataset(voc_root, [image_id], 21, lambda i: common.train_mask_path(voc_root, i))
    image, mask, _ = dataset[0]
    assert image.dtype == torch.float32 and image.shape[1:] == mask.shape
    assert np.array_equal(mask.numpy(), expected)


def test_training_masks_prefer_aug_and_val_masks_come_from_segmentation_class(voc_root):
    assert "SegmentationClassAug" in common.train_mask_path(voc_root, VOC_TRAIN_IDS[0])
    assert "SegmentationClass" + os.sep in common.val_mask_path(voc_root, VAL_IDS[0])


def test_bad_masks_and_images_are_named(voc_root):
    def load(image_id):
        return common.SegmentationDataset(voc_root, [image_id], 21, lambda i: common.train_mask_path(voc_root, i))[0]
    mask_path = os.path.join(voc_root, "SegmentationClassAug", "2007_000001.png")
    Image.fromarray(np.full((3, 3), 1, dtype=np.uint8), mode="L").save(mask_path)
    with pytest.raises(common.UserError, match="2007_000001.png is 3x3 but its image is"):
        load("2007_000001")
    bad = make_mask(1)
    bad[0, 0] = 40
    Image.fromarray(bad, mode="L").save(os.path.join(voc_root, "SegmentationClassAug", "2007_000002.png"))
    with pytest.raises(common.UserError, match="has label 40"):
        load("2007_000002")
    Image.fromarray(np.zeros((30, 36, 3), dtype=np.uint8)).save(os.path.join(voc_root, "SegmentationClassAug", "2007_000003.png"))
    with pytest.raises(common.UserError, match="RGB"):
        load("2007_000003")
    with open(os.path.join(voc_root, "JPEGImages", "2007_000004.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(common.UserError, match="cannot read image .*2007_000004.jpg"):
        load("2007_000004")


def test_custom_classes_txt(voc_root):
    assert common.read_class_names(voc_root) == common.VOC_CLASSES
    with open(os.path.join(voc_root, "classes.txt"), "w") as f:
        f.write("background\nthing\n")
    assert common.read_class_names(voc_root) == ["background", "thing"]
    # The tiny tree's labels go up to 16: with 2 classes they are invalid and named so.
    dataset = common.SegmentationDataset(voc_root, ["2007_000002"], 2, lambda i: common.train_mask_path(voc_root, i))
    with pytest.raises(common.UserError, match="neither a class \\(0-1\\)"):
        dataset[0]


def test_weak_augment_crops_pads_with_ignore_and_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    image = common.tv_tensors.Image(torch.arange(20 * 30, dtype=torch.uint8).reshape(1, 20, 30).repeat(3, 1, 1))
    mask = common.tv_tensors.Mask(torch.arange(20 * 30, dtype=torch.uint8).reshape(20, 30) % 200)
    for _ in range(10):
        out_image, out_mask = common.weak_augment(40, (1.0, 1.0))(image, mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        padded = out_mask == common.IGNORE
        assert padded.sum() == 40 * 40 - 20 * 30  # the padding, and only it, is ignored
        assert (out_image[0][padded] == 0).all()
        assert torch.equal(out_image[0][~padded] % 200, out_mask[~padded])  # same pixels moved together


def test_same_size_batches_never_mix_sizes(voc_root):
    ids = TRAIN_IDS + VAL_IDS
    batches = common.same_size_batches(voc_root, ids, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    for batch in batches:
        assert len(batch) <= 4
        assert len({Image.open(common.image_path(voc_root, ids[i])).size for i in batch}) == 1
