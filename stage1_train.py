"""Stage 1 of Ke et al. (IEEE TIP 2022): supervised training on the labelled images only.

    python stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464 --out runs/stage1
    torchrun --nproc-per-node 4 stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464 --out runs/stage1

The labelled images are drawn by --labeled N and --split-seed (classic protocol: from VOC's
train.txt; blended: from every training image with a mask), or read from --labeled-list; every
other training image is unlabelled. Writes to --out: run.json (the recipe), labeled.txt,
unlabeled.txt and val.txt (the split), checkpoint.pt (weights, optimiser, step), history.jsonl
(progress lines and val evaluations) and metrics.json (val mIoU and per-class IoU, in percent).

The same command again continues an interrupted run and leaves a finished one alone; --resume
--out DIR does the same without repeating the flags. A command with another recipe is refused.
The default length is the authors' budget: 100,000 labelled images seen (6,250 steps at batch 16).
"""
import argparse
import math
import os
import random

import torch
import torch.nn.functional as F
from torchvision import tv_tensors

import common

IMAGES_SEEN = 100_000  # the authors' stage-1 budget: 10,000 steps of 10 images, whatever the label count


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and split")
    data.add_argument("--data-root", default="data/VOCdevkit/VOC2012",
                      help="the VOC2012, Cityscapes or your own data folder, recognised by its layout (default: %(default)s)")
    data.add_argument("--labeled", type=int, help="number of labelled images, drawn by the protocol (e.g. 92, 1464)")
    data.add_argument("--protocol", choices=["classic", "blended"], default="classic",
                      help="VOC: classic draws the labelled images from VOC's train.txt (1,464), blended from all 10,582 "
                           "training images; elsewhere both draw from the masked training images (default: %(default)s)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the labelled draw (default: %(default)s)")
    data.add_argument("--labeled-list", help="file of labelled images: bare ids or the field's 'image mask' lines (splits/)")
    data.add_argument("--unlabeled-list", help="file of unlabelled images (default: every other training image)")
    data.add_argument("--batch-size", type=int, default=16, help="labelled images a step, over all processes (default: %(default)s)")
    data.add_argument("--strong-aug", action="store_true",
                      help="also give the labelled images the strong augmentation S of the multi-task stages (the "
                           "authors' RandAugment operations, moving the mask, and Cutout); off in the paper")
    common.add_training_args(parser, f"{IMAGES_SEEN:,} images seen, the authors' budget: 6,250 at batch 16")
    return parser, parser.parse_args(argv)


def read_split_file(path, description, flag):
    """Image ids of a split file: bare ids, or the 'image mask' lines of the field's split files
    ('JPEGImages/x.jpg SegmentationClass/x.png', 'leftImg8bit/train/c/x_leftImg8bit.png gtFine/...')."""
    if not os.path.isfile(path):
        raise common.UserError(f"{flag} {path} not found")
    lines = common.read_lines(path)
    if not lines:
        raise common.UserError(f"{flag} {path} lists no image")
    for other, prefix in {"voc": "JPEGImages/", "cityscapes": "leftImg8bit/", "folder": "images/"}.items():
        if other != description.kind and lines[0].startswith(prefix):
            raise common.UserError(f"{flag} {path} is a split file of {other}, but --data-root {description.root} "
                                   f"is {description.kind}; use a {description.kind} split file (splits/README.md)")
    if description.kind == "folder":
        ids = [common.image_id_of(line, description.images) for line in lines]
    else:
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0].removesuffix("_leftImg8bit") for line in lines]
    twice = sorted(i for i in set(ids) if ids.count(i) > 1) if len(set(ids)) < len(ids) else []
    if twice:
        raise common.UserError(f"{flag} {path} lists {twice[0]} twice")
    return ids


def make_split(description, args):
    """The labelled and unlabelled training ids (both sorted), as METHOD.md's protocols define them."""
    if args.labeled_list:
        labeled = read_split_file(args.labeled_list, description, "--labeled-list")
        if args.labeled is not None and args.labeled != len(labeled):
            raise common.UserError(f"--labeled {args.labeled} but --labeled-list {args.labeled_list} lists {len(labeled)} images")
    else:
        if args.labeled is None:
            raise common.UserError("give --labeled N (the number of labelled images) or --labeled-list FILE")
        pool = description.pool if args.protocol == "classic" else [i for i in description.train_ids if description.masks[i]]
        if not 1 <= args.labeled <= len(pool):
            raise common.UserError(f"--labeled {args.labeled}: the {args.protocol} protocol draws from {len(pool)} "
                                   f"images; use a number from 1 to {len(pool)}")
        labeled = random.Random(args.split_seed).sample(sorted(pool), args.labeled)
    chosen, training = set(labeled), set(description.train_ids)  # sets: membership in lists of 10,582 ids is slow
    if args.unlabeled_list:
        unlabeled = [i for i in read_split_file(args.unlabeled_list, description, "--unlabeled-list") if i not in chosen]
    else:
        unlabeled = sorted(training - chosen)
    for flag, ids in [("--labeled-list", labeled), ("--unlabeled-list", unlabeled)]:
        in_val = sorted(set(ids) & set(description.val_ids))
        if in_val:
            raise common.UserError(f"{flag}: {len(in_val)} ids are val images (first: {in_val[0]}); training on them "
                                   "would leak val")
        for image_id in ids:
            if image_id not in training or not os.path.exists(description.images[image_id]):
                where = description.images.get(image_id, f"among the training images of {description.root}")
                raise common.UserError(f"split id {image_id} has no image {where}")
    for image_id in labeled:
        if description.masks.get(image_id) is None:
            raise common.UserError(f"labelled id {image_id} has no mask in {description.root}")
    return sorted(labeled), sorted(unlabeled)


def augment(crop_size, scale_range, strong):
    """The labelled images' augmentation: the weak view, then with --strong-aug also S (the mask moved with it)."""
    weak = common.weak_augment(crop_size, scale_range)

    def transform(image, mask):
        image, mask = weak(image, mask)
        if strong:
            image, source = common.strong_augment(image)
            mask = tv_tensors.Mask(common.warp(mask, source))
        return image, mask
    return transform


def train_one_step(model, images, masks, optimizer, scheduler, amp):
    """One optimiser step on a batch of labelled crops; the loss stays on the device (reading it
    back would wait for the GPU)."""
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
    parser, args = get_args(argv)
    for flag, value in [("--batch-size", args.batch_size), ("--labeled", args.labeled)]:
        if value is not None and value < 1:
            raise common.UserError(f"{flag} {value}: it must be at least 1")
    run = common.start_run(parser, args, argv, "stage1_train.py")
    if run is None:
        return
    args, description, device, checkpoint = run
    if args.backbone != "tiny_unet" and args.batch_size < 2 * args.world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: DeepLabv3's image pooling normalises over the batch, "
                               f"so each of the {args.world_size} processes needs at least 2 images a step")
    torch.manual_seed(args.seed)
    random.seed(args.seed + args.rank)  # each process augments differently
    labeled, unlabeled = (checkpoint["labeled"], checkpoint["unlabeled"]) if checkpoint else make_split(description, args)
    common.write_split(args.out, description, labeled, unlabeled)
    if args.iters is None:
        args.iters = math.ceil((args.epochs * len(labeled) if args.epochs else IMAGES_SEEN) / args.batch_size)
    print(f"{args.iters} steps of {args.batch_size} on {device}" + (f" ({args.world_size} processes)" if args.distributed else ""))

    class_names = description.class_names
    model = common.build_model(args.backbone, len(class_names), args.weights)
    optimizer, scheduler = common.make_optimizer(model, args)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        step = checkpoint["step"]
    net = common.prepare_model(model, args, device)
    if checkpoint is not None:  # after the model is on the device: the optimiser's state follows it there
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])

    crop = (args.crop_size * 2)[:2]  # one number: a square
    scale_range = [args.image_scale * s for s in args.scale_range]  # relative to the image as read
    train_set = common.SegmentationDataset(description, labeled, augment(crop, scale_range, args.strong_aug))
    batches = common.train_loader(train_set, args.batch_size, args.workers, args.seed, step, args.rank, args.world_size)
    val_loader = common.full_image_loader(common.SegmentationDataset(description, description.val_ids), 8, args.workers,
                                          args.rank, args.world_size, args.image_scale)

    def validate():
        return common.evaluate(model, val_loader, device, len(class_names), args.image_scale, args.amp)

    progress = common.Progress(args.out, step, args.iters, args.print_every)
    while step < args.iters:
        images, masks, _ = next(batches)
        loss = train_one_step(net, common.images_to_device(images, device, args.channels_last),
                              masks.to(device, non_blocking=True), optimizer, scheduler, args.amp)
        step += 1
        progress.update(step, {"loss": loss}, scheduler.get_last_lr()[0])
        if (step % args.save_every == 0 or step == args.iters) and common.is_main_process():
            common.check_finite({"loss": loss}, step)  # never save weights that have become NaN
            common.atomic_write(os.path.join(args.out, "checkpoint.pt"), lambda tmp: torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "args": vars(args), "labeled": labeled, "unlabeled": unlabeled, "class_names": class_names,
                "palette": description.palette, "stage": 1}, tmp))
        if args.eval_every and step % args.eval_every == 0 and step < args.iters:
            miou = validate().miou()
            print(f"step {step}: val mIoU {miou:.2f}")
            progress.log({"step": step, "val_miou": miou})

    confusion = validate()
    print(f"val IoU after {step} steps:\n{confusion.table(class_names)}")
    progress.log({"step": step, "val_miou": confusion.miou()})
    if common.is_main_process():
        common.write_json(os.path.join(args.out, "metrics.json"), {"step": step, **confusion.report(class_names)})


if __name__ == "__main__":
    common.run_main(main)
