"""The loop after labelling: stage2_pseudolabel.py ranks the unlabelled images in label_next.csv; once the first K
have masks, stage1_train.py --add-labeled DIR K trains again on the old labelled images and the new ones, and every
split file after it says which labelling round each labelled image came in."""
import csv
import os
import shutil

from PIL import Image

from conftest import TINY_TRAIN, assert_user_error, run_script
from test_own_data import labels, write_own_data

TINY_MULTITASK = ["--backbone", "tiny_unet", "--no-pretrained", "--crop-size", "24", "--batch-labeled", "1",
                  "--batch-unlabeled", "2", "--iters", "2", "--workers", "0", "--device", "cpu"]


def rounds_of(folder):
    with open(os.path.join(folder, "labeled_rounds.csv"), newline="") as f:
        return {row["id"]: int(row["round"]) for row in csv.DictReader(f)}


def lines(path):
    return open(path).read().split()


def ranked(folder):
    with open(os.path.join(folder, "label_next.csv"), newline="") as f:
        return [row["id"] for row in csv.DictReader(f)]


def label(root, image_ids):
    """What a user does: draw the masks of these images and put them into masks/."""
    for image_id in image_ids:
        Image.fromarray(labels(3), mode="L").save(os.path.join(root, "masks", f"{image_id}.png"))


def first_round(tmp_path):
    """Your own data of 14 images, 8 with a mask; stage 1 on 3 of them and its pseudo-masks."""
    root = str(tmp_path / "mydata")
    write_own_data(root, count=14, masked=8)
    run_script("stage1_train.py", "--data-root", root, "--labeled", 3, *TINY_TRAIN, "--out", tmp_path / "s1")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1", "--workers", 0,
               "--device", "cpu")
    return root


def test_the_next_round_adds_the_first_k_of_label_next_once_they_have_masks(tmp_path):
    root = first_round(tmp_path)
    old = lines(tmp_path / "s1" / "labeled.txt")
    assert rounds_of(tmp_path / "s1") == {i: 1 for i in old} and rounds_of(tmp_path / "p1") == {i: 1 for i in old}
    first = ranked(tmp_path / "p1")[:2]
    assert not os.path.exists(os.path.join(root, "masks", f"{first[0]}.png"))  # ranked: the images without a mask

    def next_round(k, out):
        return run_script("stage1_train.py", "--data-root", root, "--add-labeled", tmp_path / "p1", k, *TINY_TRAIN,
                          "--out", out, check=False)
    refused = next_round(2, tmp_path / "s2")
    assert_user_error(refused, "--add-labeled: 2 of the first 2 images", "have no mask yet", first[0], "rank 1")
    assert not os.path.exists(tmp_path / "s2" / "checkpoint.pt")
    label(root, first)
    # Without a val.txt, val is a seeded fifth of the masked images, which the new masks would change: it is kept.
    result = next_round(2, tmp_path / "s2")
    assert result.returncode == 0, result.stderr
    assert f"val: the 1 images of {tmp_path / 'p1' / 'val.txt'}, the run's val (no val.txt in {root})" in result.stdout
    assert "5 labelled and 8 unlabelled training images (2 labelled in later rounds" in result.stdout
    assert lines(tmp_path / "s2" / "val.txt") == lines(tmp_path / "s1" / "val.txt")
    assert lines(tmp_path / "s2" / "labeled.txt") == sorted(old + first)
    assert not set(first) & set(lines(tmp_path / "s2" / "unlabeled.txt"))
    assert rounds_of(tmp_path / "s2") == {**{i: 1 for i in old}, **{i: 2 for i in first}}

    # The rounds travel with the split: through the pseudo-masks, the multi-task stage, and a third round.
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s2", "--out", tmp_path / "p2", "--workers", 0,
               "--device", "cpu")
    run_script("stage3_multitask.py", "--pseudo", tmp_path / "p2", *TINY_MULTITASK, "--out", tmp_path / "m2")
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "m2", "--out", tmp_path / "p3", "--workers", 0,
               "--device", "cpu")
    for folder in ["p2", "m2", "p3"]:
        assert rounds_of(tmp_path / folder) == rounds_of(tmp_path / "s2"), folder
        assert lines(tmp_path / folder / "val.txt") == lines(tmp_path / "s1" / "val.txt"), folder
    third = ranked(tmp_path / "p3")[:1]
    label(root, third)
    run_script("stage1_train.py", "--data-root", root, "--add-labeled", tmp_path / "p3", 1, *TINY_TRAIN,
               "--out", tmp_path / "s3")
    assert rounds_of(tmp_path / "s3") == {**rounds_of(tmp_path / "s2"), third[0]: 3}


def test_a_runs_val_stays_as_masks_are_added(tmp_path):
    """Without a val.txt, val is a seeded fifth of the masked images: a run's later commands keep the run's val."""
    root = first_round(tmp_path)
    val = lines(tmp_path / "s1" / "val.txt")
    label(root, ranked(tmp_path / "p1")[:3])  # 11 masked images: the data's seeded fifth is now another
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "s1", "--device", "cpu")
    assert f"on {len(val)} val images of {root}" in result.stdout
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "s1", "--out", tmp_path / "p1b", "--workers", 0,
               "--device", "cpu")
    assert lines(tmp_path / "p1b" / "val.txt") == val
    run_script("stage3_multitask.py", "--pseudo", tmp_path / "p1", *TINY_MULTITASK, "--out", tmp_path / "m1")
    assert lines(tmp_path / "m1" / "val.txt") == val
    fresh = run_script("stage1_train.py", "--data-root", root, "--labeled", 3, *TINY_TRAIN, "--out", tmp_path / "new")
    assert "val: 2 of the 11 masked images, a seeded fifth" in fresh.stdout  # a new split draws val anew
    run_script("stage2_pseudolabel.py", "--checkpoint", tmp_path / "new", "--out", tmp_path / "pnew", "--workers", 0,
               "--device", "cpu")
    leak = run_script("stage3_multitask.py", "--pseudo", tmp_path / "pnew", "--init", tmp_path / "s1",
                      *TINY_MULTITASK, "--out", tmp_path / "mnew", check=False)  # s1 trained on the new val's images
    assert_user_error(leak, f"of {tmp_path / 's1' / 'checkpoint.pt'}'s training are val images of {root} now")
    assert not os.path.exists(tmp_path / "mnew")
    # Where the data has a val list, it decides; a round measured on another val is refused.
    shutil.copy(tmp_path / "new" / "val.txt", os.path.join(root, "val.txt"))
    refused = run_script("stage1_train.py", "--data-root", root, "--add-labeled", tmp_path / "p1", 1, *TINY_TRAIN,
                         "--out", tmp_path / "s2", check=False)
    assert_user_error(refused, f"(its val list) are not those of {tmp_path / 'p1' / 'val.txt'}, the earlier round's",
                      "draw a new split with --labeled")


def test_the_next_round_refuses_what_it_cannot_do(tmp_path):
    root = first_round(tmp_path)
    count = len(ranked(tmp_path / "p1"))

    def next_round(*flags, data_root=root):
        return run_script("stage1_train.py", "--data-root", data_root, *flags, *TINY_TRAIN, "--out", tmp_path / "s2",
                          check=False)
    assert_user_error(next_round("--add-labeled", tmp_path / "p1", "many"), "K must be a number from 1 to", str(count))
    assert_user_error(next_round("--add-labeled", tmp_path / "p1", count + 1), "K must be a number from 1 to")
    assert_user_error(next_round("--add-labeled", tmp_path / "p1", 1, "--labeled", 4), "leave out --labeled")
    assert_user_error(next_round("--add-labeled", tmp_path / "s1", 1), "holds no outputs of stage2_pseudolabel.py")
    other = str(tmp_path / "other")
    write_own_data(other, count=14, masked=8)
    assert_user_error(next_round("--add-labeled", tmp_path / "p1", 1, data_root=other), "was made on", "not on")
    inside = run_script("stage1_train.py", "--data-root", root, "--add-labeled", tmp_path / "p1", 1, *TINY_TRAIN,
                        "--out", tmp_path / "p1" / "next", check=False)
    assert_user_error(inside, f"--out {tmp_path / 'p1' / 'next'} is inside {tmp_path / 'p1'}")
    os.remove(tmp_path / "p1" / "label_next.csv")
    assert_user_error(next_round("--add-labeled", tmp_path / "p1", 1), "has no label_next.csv")
    assert not os.path.exists(tmp_path / "s2")


def test_a_folder_written_before_rounds_counts_its_labelled_images_as_the_first(tmp_path):
    root = first_round(tmp_path)
    os.remove(tmp_path / "p1" / "labeled_rounds.csv")  # as a pseudo-mask folder of an earlier version
    first = ranked(tmp_path / "p1")[:1]
    label(root, first)
    shutil.copy(tmp_path / "p1" / "val.txt", os.path.join(root, "val.txt"))
    run_script("stage1_train.py", "--data-root", root, "--add-labeled", tmp_path / "p1", 1, *TINY_TRAIN,
               "--out", tmp_path / "s2")
    assert rounds_of(tmp_path / "s2") == {**{i: 1 for i in lines(tmp_path / "s1" / "labeled.txt")}, first[0]: 2}
