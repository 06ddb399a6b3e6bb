"""The VOC loader and the split protocols, on the tiny tree of conftest.py; the split files shipped."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import training
import stage1_train
from conftest import ROOT, TRAIN_IDS, VAL_IDS, VOC_TRAIN_IDS, make_mask, write_voc_tree


def describe(root):
    return common.describe_dataset(root)


def split(root, labeled, protocol="classic", seed=0, labeled_list=None, unlabeled_list=None):
    args = argparse.Namespace(labeled=labeled, protocol=protocol, split_seed=seed, labeled_list=labeled_list,
                              unlabeled_list=unlabeled_list, add_labeled=None)
    return stage1_train.make_split(describe(root), args)[:2]


def test_training_ids_come_from_the_aug_folder_minus_val(voc_root):
    # SegmentationClassAug also holds the val masks, as the real SBD folder does: they must not train.
    description = describe(voc_root)
    assert description.kind == "voc" and description.train_ids == TRAIN_IDS and description.val_ids == VAL_IDS


def test_training_ids_prefer_train_aug_txt(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), train_aug_list=True)
    assert describe(root).train_ids == TRAIN_IDS[:10]


def test_training_ids_fall_back_to_voc_train_txt(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), with_aug=False)
    assert describe(root).train_ids == VOC_TRAIN_IDS
    labeled, unlabeled = split(root, 3)
    assert len(labeled) == 3 and sorted(labeled + unlabeled) == VOC_TRAIN_IDS


def test_classic_protocol_draws_from_voc_train_and_leaves_the_rest_unlabelled(voc_root):
    labeled, unlabeled = split(voc_root, 5, "classic", seed=0)
    assert len(labeled) == 5 and set(labeled) <= set(VOC_TRAIN_IDS)
    assert sorted(labeled + unlabeled) == TRAIN_IDS and not set(labeled) & set(unlabeled)
    assert not set(unlabeled) & set(VAL_IDS)


def test_blended_protocol_draws_from_all_training_ids(voc_root):
    draws = {tuple(split(voc_root, 10, "blended", seed=s)[0]) for s in range(5)}
    assert any(set(d) - set(VOC_TRAIN_IDS) for d in draws)  # reaches beyond train.txt
    assert all(len(d) == 10 for d in draws)


def test_split_is_deterministic_in_its_seed(voc_root):
    assert split(voc_root, 4, seed=1) == split(voc_root, 4, seed=1)
    assert len({tuple(split(voc_root, 4, seed=s)[0]) for s in range(6)}) > 1


@pytest.mark.parametrize("labeled", [0, -3, 9])
def test_labeled_count_outside_the_protocol_is_refused(voc_root, labeled):
    with pytest.raises(common.UserError, match="--labeled"):
        split(voc_root, labeled, "classic")


def test_both_split_file_formats_are_read(voc_root, tmp_path):
    bare = tmp_path / "bare.txt"
    bare.write_text("2007_000002\n2007_000005\n\n")
    paired = tmp_path / "paired.txt"
    paired.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in ["2007_000009", "2007_000003"]))
    description = describe(voc_root)
    assert stage1_train.read_split_file(str(bare), description, "f") == ["2007_000002", "2007_000005"]
    assert stage1_train.read_split_file(str(paired), description, "f") == ["2007_000009", "2007_000003"]
    labeled, unlabeled = split(voc_root, None, labeled_list=str(paired), unlabeled_list=str(bare))
    assert labeled == ["2007_000003", "2007_000009"] and unlabeled == ["2007_000002", "2007_000005"]


def test_split_list_errors(voc_root, tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        split(voc_root, None, labeled_list=str(tmp_path / "nope.txt"))
    leak = tmp_path / "leak.txt"
    leak.write_text(f"{VAL_IDS[0]}\n")
    with pytest.raises(common.UserError, match="val images"):
        split(voc_root, None, labeled_list=str(leak))
    ghost = tmp_path / "ghost.txt"
    ghost.write_text("2099_000001\n")
    with pytest.raises(common.UserError, match="split id 2099_000001 has no image"):
        split(voc_root, None, labeled_list=str(ghost))
    with pytest.raises(common.UserError, match="lists 1 images"):
        split(voc_root, 3, labeled_list=str(ghost))
    twice = tmp_path / "twice.txt"
    twice.write_text("2007_000001\n2007_000002\n2007_000002\n")
    with pytest.raises(common.UserError, match="lists 2007_000002 twice"):  # the id is named
        split(voc_root, None, labeled_list=str(twice))


def test_a_cityscapes_split_file_on_voc_is_named_so(voc_root):
    path = os.path.join(ROOT, "splits", "ke2022", "cityscapes_100_labeled.txt")
    with pytest.raises(common.UserError, match="is a split file of cityscapes, but --data-root .* is voc"):
        split(voc_root, None, labeled_list=path)


@pytest.mark.parametrize("name,count", [("ke2022/pascal_212_labeled.txt", 212), ("unimatch/pascal/92_labeled.txt", 92),
                                        ("unimatch/pascal/1464_labeled.txt", 1464), ("unimatch/pascal/1_16_labeled.txt", 662)])
def test_the_shipped_voc_split_files_are_read_as_they_are(tmp_path, name, count):
    """A VOC tree whose training ids are exactly those of the split file: every line is found."""
    path = os.path.join(ROOT, "splits", name)
    root = tmp_path / "VOC2012"
    ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in common.read_lines(path)]
    for folder in ["JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"]:
        (root / folder).mkdir(parents=True)
    tiny = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    mask = Image.fromarray(np.zeros((4, 4), np.uint8), mode="L")
    for image_id in ids + ["2099_999999"]:
        tiny.save(root / "JPEGImages" / f"{image_id}.jpg")
        mask.save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("2099_999999\n")
    labeled, unlabeled = split(str(root), count, labeled_list=path)
    assert len(labeled) == count and sorted(labeled) == sorted(ids) and unlabeled == []


def test_unlabelled_images_need_no_mask(tmp_path):
    root = write_voc_tree(str(tmp_path / "VOC2012"), train_aug_list=True)
    os.remove(os.path.join(root, "SegmentationClassAug", "2007_000010.png"))  # not in train.txt: no mask at all now
    labeled, unlabeled = split(root, 8, "classic")
    assert "2007_000010" in unlabeled and describe(root).masks["2007_000010"] is None


def dataset_of(root, image_id):
    return common.SegmentationDataset(describe(root), [image_id])


@pytest.mark.parametrize("image_id,folder", [("2007_000001", "SegmentationClass"), ("2007_000009", "SegmentationClassAug")])
def test_masks_are_class_indices_from_both_kinds_of_png(tmp_path, image_id, folder):
    root = write_voc_tree(str(tmp_path / "VOC2012"), train_aug_list=True)  # training ids from train_aug.txt
    index = (TRAIN_IDS + VAL_IDS).index(image_id)
    expected = make_mask(index)
    if folder == "SegmentationClass":
        os.remove(os.path.join(root, "SegmentationClassAug", f"{image_id}.png"))
    path = describe(root).masks[image_id]
    assert folder in path and Image.open(path).mode == ("P" if folder == "SegmentationClass" else "L")
    image, mask, _ = dataset_of(root, image_id)[0]
    assert image.dtype == torch.uint8 and image.shape[1:] == mask.shape  # normalized on the device, later
    assert np.array_equal(mask.numpy(), expected)


def test_training_masks_prefer_aug_and_val_masks_come_from_segmentation_class(voc_root):
    description = describe(voc_root)
    assert "SegmentationClassAug" in description.masks[VOC_TRAIN_IDS[0]]
    assert "SegmentationClass" + os.sep in description.masks[VAL_IDS[0]]


def test_bad_masks_and_images_are_named(voc_root):
    def load(image_id):
        return dataset_of(voc_root, image_id)[0]
    mask_path = os.path.join(voc_root, "SegmentationClassAug", "2007_000001.png")
    Image.fromarray(np.full((3, 3), 1, dtype=np.uint8), mode="L").save(mask_path)
    with pytest.raises(common.UserError, match="2007_000001.png is 3x3 but its image is"):
        load("2007_000001")
    bad = make_mask(1)
    bad[0, 0] = 40
    Image.fromarray(bad, mode="L").save(os.path.join(voc_root, "SegmentationClassAug", "2007_000002.png"))
    with pytest.raises(common.UserError, match="has the value 40"):
        load("2007_000002")
    colours = np.zeros((30, 36, 3), dtype=np.uint8)
    colours[..., 0] = 128  # a coloured mask (not grey): VOC's classes have no colours to read it by
    Image.fromarray(colours).save(os.path.join(voc_root, "SegmentationClassAug", "2007_000003.png"))
    with pytest.raises(common.UserError, match="2007_000003.png is a colour image"):
        load("2007_000003")
    with open(os.path.join(voc_root, "JPEGImages", "2007_000004.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(common.UserError, match="cannot read image .*2007_000004.jpg"):
        load("2007_000004")


def test_custom_classes_txt(voc_root):
    assert describe(voc_root).class_names == common.VOC_CLASSES
    with open(os.path.join(voc_root, "classes.txt"), "w") as f:
        f.write("background\nthing\n")
    assert describe(voc_root).class_names == ["background", "thing"]
    # The tiny tree's labels go up to 16: with 2 classes they are invalid and named so.
    with pytest.raises(common.UserError, match="neither a class \\(0-1\\)"):
        dataset_of(voc_root, "2007_000002")[0]


def test_a_root_that_is_no_dataset_is_named(tmp_path):
    with pytest.raises(common.UserError, match="is neither VOC2012 .* nor your own data"):
        describe(str(tmp_path))
    with pytest.raises(common.UserError, match="is not a folder"):
        describe(str(tmp_path / "nothing"))


def test_weak_augment_crops_pads_with_ignore_and_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    image = common.tv_tensors.Image(torch.arange(20 * 30, dtype=torch.uint8).reshape(1, 20, 30).repeat(3, 1, 1))
    mask = common.tv_tensors.Mask(torch.arange(20 * 30, dtype=torch.uint8).reshape(20, 30) % 200)
    for _ in range(10):
        out_image, out_mask = training.weak_augment((40, 40), (1.0, 1.0))(image, mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        padded = out_mask == common.IGNORE
        assert padded.sum() == 40 * 40 - 20 * 30  # the padding, and only it, is ignored
        assert (out_image[0][padded] == 0).all()
        assert torch.equal(out_image[0][~padded] % 200, out_mask[~padded])  # same pixels moved together


def test_weak_augment_takes_a_non_square_crop():
    image = common.tv_tensors.Image(torch.zeros(3, 50, 90, dtype=torch.uint8))
    out_image, out_mask = training.weak_augment((24, 48), (1.0, 1.0))(image, common.tv_tensors.Mask(torch.zeros(50, 90, dtype=torch.uint8)))
    assert out_image.shape == (3, 24, 48) and out_mask.shape == (24, 48)


def test_full_image_batches_never_mix_sizes(voc_root):
    description = describe(voc_root)
    dataset = common.SegmentationDataset(description, TRAIN_IDS + VAL_IDS)
    batches = list(common.full_image_loader(dataset, 4, 0).batch_sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
    for batch in batches:
        assert len(batch) <= 4
        assert len({Image.open(description.images[dataset.ids[i]]).size for i in batch}) == 1
    # Two processes take every other image, together all of them.
    shares = [list(common.full_image_loader(dataset, 4, 0, rank, 2).batch_sampler) for rank in range(2)]
    assert sorted(i for share in shares for b in share for i in b) == list(range(len(dataset)))


def test_shuffled_stream_is_shared_by_processes_and_resumes_where_it_stopped():
    def take(stream, n):
        return [next(stream) for _ in range(n)]
    one = take(training.shuffled_stream(5, seed=3), 12)
    indices, seeds = [index for index, _ in one], [seed for _, seed in one]
    assert sorted(indices[:5]) == list(range(5)) and sorted(indices[5:10]) == list(range(5))
    assert indices[:5] != indices[5:10] and len(set(seeds)) == 12  # every sample its own augmentation seed
    two = [take(training.shuffled_stream(5, seed=3, rank=r, world=2), 6) for r in range(2)]
    assert [two[r][i // 2] for i in range(12) for r in [i % 2]] == one  # the two shares interleave into the one stream
    assert take(training.shuffled_stream(5, seed=3, start=7), 5) == one[7:12]  # seeds too: a resume is exact
    assert not set(seeds) & {seed for _, seed in take(training.shuffled_stream(5, seed=4), 12)}
