"""Stage 1 of Ke et al. (IEEE TIP 2022), the paper's stage 1: supervised training on the labelled images only.

    python stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464 --out runs/stage1
    torchrun --nproc-per-node 4 stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464 --out runs/stage1

The labelled images are drawn by --labeled N and --split-seed from the training images that have a mask (classic
protocol on VOC: from VOC's train.txt), or read from --labeled-list; every other training image is unlabelled.
After a round of pseudo-masks, --add-labeled DIR K trains again on DIR's labelled images and the first K of its
label_next.csv, which you have labelled since:

    python stage1_train.py --data-root mydata --add-labeled runs/mydata_50/pseudo3 20 --out runs/round2/stage1

Writes to --out: run.json (the recipe), labeled.txt, unlabeled.txt and val.txt (the split), labeled_rounds.csv
(each labelled image's labelling round: 1 for the first split, one more with each --add-labeled), checkpoint.pt
(weights, optimiser, step, random state), history.jsonl (progress lines and val evaluations) and metrics.json (val
mIoU and per-class IoU, in percent). The default length is the authors' budget: 100,000 labelled images seen
(6,250 steps at batch 16).

The same command again continues an interrupted run from its last checkpoint and ends with the same weights as a
run never stopped (on the CPU; GPU kernels need not be deterministic); it leaves a finished run alone. --resume
--out DIR does the same without repeating the flags. A command with another recipe is refused, naming the flag.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse
import csv
import math
import random

import torch
import torch.nn.functional as F
from torchvision import tv_tensors

import common
import outputs
import training
from common import UserError

IMAGES_SEEN = 100_000  # the authors' stage-1 budget: 10,000 steps of 10 images, whatever the label count


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and split")
    data.add_argument("--data-root", default="data/VOCdevkit/VOC2012",
                      help="VOC2012 or a VOC-style export, Cityscapes or your own data, recognised by its layout "
                           "(default: %(default)s)")
    data.add_argument("--labeled", type=int, help="number of labelled images, drawn by the protocol (e.g. 92, 1464)")
    data.add_argument("--protocol", choices=["classic", "blended"], default="classic",
                      help="VOC: classic draws the labelled images from VOC's train.txt (1,464), blended from all "
                           "10,582 training images; elsewhere both draw from the training images with a mask "
                           "(default: %(default)s)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the labelled draw (default: %(default)s)")
    data.add_argument("--labeled-list", help="file of labelled images: bare ids or the field's 'image mask' lines")
    data.add_argument("--unlabeled-list", help="file of unlabelled images (default: every other training image)")
    data.add_argument("--add-labeled", nargs=2, metavar=("DIR", "K"),
                      help="the next labelling round, instead of --labeled: the labelled images of DIR's split (a "
                           "stage2_pseudolabel.py --out) and the first K images of its label_next.csv, whose masks "
                           "you have added to the data since; DIR's val is kept")
    data.add_argument("--batch-size", type=int, default=16,
                      help="labelled images a step, over all processes (default: %(default)s)")
    data.add_argument("--strong-aug", action="store_true",
                      help="also give the labelled images the strong augmentation S of the multi-task stages (the "
                           "authors' RandAugment operations, moving the mask, and Cutout); off in the paper")
    training.add_training_args(parser, f"{IMAGES_SEEN:,} images seen, the authors' budget: 6,250 at batch 16")
    return parser


def read_split_file(path, description, flag):
    """Image ids of a split file: bare ids, or the 'image mask' lines of the field's split files
    ('JPEGImages/x.jpg SegmentationClass/x.png', 'leftImg8bit/train/c/x_leftImg8bit.png gtFine/...')."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} not found")
    lines = common.read_lines(path)
    if not lines:
        raise UserError(f"{flag} {path} lists no image")
    for other, prefix in {"voc": "JPEGImages/", "cityscapes": "leftImg8bit/", "folder": "images/"}.items():
        if other != description.kind and lines[0].startswith(prefix):
            raise UserError(f"{flag} {path} is a split file of {other}, but --data-root {description.root} "
                            f"is {description.kind}; use a {description.kind} split file (splits/README.md)")
    if description.kind == "folder":
        ids = [common.image_id_of(line, description.images) for line in lines]
    else:
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0].removesuffix("_leftImg8bit") for line in lines]
    twice = sorted(i for i in set(ids) if ids.count(i) > 1) if len(set(ids)) < len(ids) else []
    if twice:
        raise UserError(f"{flag} {path} lists {twice[0]} twice")
    return ids


def next_round(description, folder, count):
    """--add-labeled DIR K: {id: labelling round} of DIR's labelled images and, one round later, of the first K
    images of its label_next.csv, each of which must have a mask by now."""
    record = outputs.read_record(folder, "--add-labeled", "stage2_pseudolabel.py")
    ranking = os.path.join(folder, "label_next.csv")
    if not os.path.exists(ranking):
        raise UserError(f"--add-labeled {folder} has no label_next.csv; run the command that made it again")
    if record["recipe"]["data_root"] != os.path.realpath(description.root):
        raise UserError(f"--add-labeled {folder} was made on {record['recipe']['data_root']}, not on --data-root "
                        f"{description.root}")
    val = os.path.join(folder, "val.txt")
    if os.path.exists(val) and common.read_lines(val) != sorted(description.val_ids):
        raise UserError(f"the val images of {description.root} (its val list) are not those of {val}, the earlier "
                        "round's; list the same ones, or draw a new split with --labeled")
    rounds = outputs.read_rounds(folder)
    with open(ranking, newline="", encoding="utf-8") as f:
        ranked = [row["id"] for row in csv.DictReader(f)]
    if not count.isdigit() or not 1 <= int(count) <= len(ranked):
        raise UserError(f"--add-labeled {folder} {count}: K must be a number from 1 to {len(ranked)}, the images "
                        "ranked in its label_next.csv")
    added = ranked[:int(count)]
    unlabelled = [i for i in added if not description.masks.get(i)]
    if unlabelled:
        raise UserError(f"--add-labeled: {len(unlabelled)} of the first {count} images of {ranking} have no mask yet "
                        f"(first: {unlabelled[0]}, rank {added.index(unlabelled[0]) + 1}); label them, or give a "
                        "smaller K")
    return {**rounds, **{i: max(rounds.values()) + 1 for i in added}}


def make_split(description, args):
    """The labelled and unlabelled training ids (both sorted), and each labelled image's labelling round. A
    labelled image always has a mask."""
    rounds = None
    if args.add_labeled:
        if args.labeled is not None or args.labeled_list:
            raise UserError("--add-labeled takes the labelled images from its DIR: leave out --labeled and "
                            "--labeled-list")
        rounds = next_round(description, *args.add_labeled)
        labeled = list(rounds)
    elif args.labeled_list:
        labeled = read_split_file(args.labeled_list, description, "--labeled-list")
        if args.labeled is not None and args.labeled != len(labeled):
            raise UserError(f"--labeled {args.labeled} but --labeled-list {args.labeled_list} lists "
                            f"{len(labeled)} images")
    else:
        if args.labeled is None:
            raise UserError("give --labeled N (the number of labelled images) or --labeled-list FILE")
        pool = description.pool if args.protocol == "classic" else [i for i in description.train_ids
                                                                    if description.masks[i]]
        if not 1 <= args.labeled <= len(pool):
            raise UserError(f"--labeled {args.labeled}: the {args.protocol} protocol draws from the {len(pool)} "
                            "training images with a mask; " + (f"use a number from 1 to {len(pool)}" if pool else
                                                               "every masked image is in val: list fewer in val.txt"))
        labeled = random.Random(args.split_seed).sample(sorted(pool), args.labeled)
    chosen, training_ids = set(labeled), set(description.train_ids)  # sets: membership in lists of 10,582 ids is slow
    if args.unlabeled_list:
        listed = read_split_file(args.unlabeled_list, description, "--unlabeled-list")
        unlabeled = [i for i in listed if i not in chosen]
    else:
        unlabeled = sorted(training_ids - chosen)
    for flag, ids in [("--add-labeled" if args.add_labeled else "--labeled-list", labeled),
                      ("--unlabeled-list", unlabeled)]:
        in_val = sorted(set(ids) & set(description.val_ids))
        if in_val:
            raise UserError(f"{flag}: {len(in_val)} ids are val images (first: {in_val[0]}); training on them "
                            "would leak val")
        for image_id in ids:
            if image_id not in training_ids or not os.path.exists(description.images[image_id]):
                where = description.images.get(image_id, f"among the training images of {description.root}")
                raise UserError(f"split id {image_id} has no image {where}")
    for image_id in labeled:
        if description.masks.get(image_id) is None:
            raise UserError(f"labelled id {image_id} has no mask in {description.root}")
    return sorted(labeled), sorted(unlabeled), rounds or {i: 1 for i in labeled}


def augment(crop_size, scale_range, strong):
    """The labelled images' augmentation: the weak view, then with --strong-aug also S (the mask moved with it)."""
    weak = training.weak_augment(crop_size, scale_range)

    def transform(image, mask):
        image, mask = weak(image, mask)
        if strong:
            image, source = training.strong_augment(image)
            mask = tv_tensors.Mask(training.warp(mask, source))
        return image, mask
    return transform


def train_one_step(model, images, masks, optimizer, scheduler, amp):
    """One optimiser step on a batch of labelled crops; the loss stays on the device (reading it back would wait
    for the GPU)."""
    model.train()
    with common.autocast(images.device, amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), masks, ignore_index=common.IGNORE)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


def main(argv=None):
    args = training.parse_args(get_args_parser(), argv, "stage1_train.py")
    training.check_batch(args, args.batch_size, "--batch-size")
    previous = args.add_labeled[0] if args.add_labeled else None  # the round before: its val is kept
    run = training.start_run(args, "stage1_train.py", lambda description, checkpoint: make_split(description, args)
                             if checkpoint is None else training.split_of(checkpoint), [previous], val_from=previous)
    if run is None:
        return
    args, description, device, checkpoint, (labeled, unlabeled, rounds) = run
    torch.manual_seed(args.seed)
    if args.iters is None:
        args.iters = math.ceil((args.epochs * len(labeled) if args.epochs else IMAGES_SEEN) / args.batch_size)
    print(f"{args.iters} steps of {args.batch_size} on {device}"
          + (f" ({args.world_size} processes)" if args.distributed else ""))

    class_names = description.class_names
    model = common.build_model(args.backbone, len(class_names), args.weights)
    optimizer, scheduler = training.make_optimizer(model, args)
    model = training.prepare_model(model, args, device)
    step = training.restore(checkpoint, args.out, {"model": training.unwrapped(model)}, optimizer, scheduler)

    crop = (args.crop_size * 2)[:2]  # one number: a square
    scale_range = [args.image_scale * s for s in args.scale_range]  # relative to the image as read
    train_set = common.SegmentationDataset(description, labeled, augment(crop, scale_range, args.strong_aug))
    batches = training.train_loader(train_set, args.batch_size, args.workers, args.seed, step, args.rank,
                                    args.world_size)
    val_loader = training.val_loader(description, args)

    def validate():
        return training.validate(training.unwrapped(model), val_loader, args, device, len(class_names))

    def save(step):
        outputs.save_checkpoint(args.out, step, model=training.unwrapped(model).state_dict(),
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), args=vars(args),
                                labeled=labeled, unlabeled=unlabeled, labeled_rounds=rounds,
                                class_names=class_names, palette=description.palette, stage=1)

    progress = training.Progress(args.out, step, args.iters, args.print_every)
    while step < args.iters:
        images, masks, _ = next(batches)
        loss = train_one_step(model, common.images_to_device(images, device, args.channels_last),
                              masks.to(device, non_blocking=True), optimizer, scheduler, args.amp)
        step += 1
        progress.update(step, {"loss": loss}, scheduler.get_last_lr()[0])
        training.after_step(args, step, {"loss": loss}, save, validate, progress)
    training.final_report(args, step, validate(), progress, class_names)


if __name__ == "__main__":
    outputs.run_main(main)
