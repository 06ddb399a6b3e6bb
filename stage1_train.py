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
import concurrent.futures
import datetime
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
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
    add_training_args(parser, f"{IMAGES_SEEN:,} images seen, the authors' budget: 6,250 at batch 16")
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


# ============================================================================= a training run, here and in stage 3
# How a training run starts, steps and reports. stage3_multitask.py runs the same way and takes
# these from here, as torchvision's references/classification/train_quantization.py takes its
# training pieces from train.py.

def add_training_args(parser, default_length):
    """The model, optimisation and running flags that stages 1 and 3 share."""
    group = parser.add_argument_group("model and training")
    group.add_argument("--backbone", choices=common.BACKBONES, default="resnet101",
                       help="DeepLabv3 backbone at output stride 8; tiny_unet is the CPU demo's (default: %(default)s)")
    group.add_argument("--weights", choices=["imagenet", "coco", "none"], default="imagenet",
                       help="the backbone's start: torchvision's ImageNet weights (the field's protocol), its COCO-trained "
                            "DeepLabv3 (the paper's setting on VOC), or none (default: %(default)s)")
    group.add_argument("--no-pretrained", dest="weights", action="store_const", const="none", help="the same as --weights none")
    group.add_argument("--image-scale", type=float, default=1.0, help="resize every image by this factor, in training, "
                       "pseudo-labelling and evaluation (0.5 on Cityscapes: the authors' 1024x512) (default: %(default)s)")
    group.add_argument("--crop-size", type=int, nargs="+", default=[321], metavar="SIZE",
                       help="training crop: one number for a square, or HEIGHT WIDTH (default: 321)")
    group.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 1.5], metavar=("MIN", "MAX"),
                       help="random rescaling of the image before cropping, the authors' (default: 0.5 1.5)")
    group.add_argument("--iters", type=int, help=f"optimiser steps (default: {default_length})")
    group.add_argument("--epochs", type=float, help="passes over the training stream, instead of --iters")
    group.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                       help="sgd: momentum 0.9, the DeepLab recipe; adamw: for training from scratch (default: %(default)s)")
    group.add_argument("--lr", type=float, default=0.001, help="learning rate of the backbone (default: %(default)s)")
    group.add_argument("--head-lr-mult", type=float, default=10.0,
                       help="the new layers' (heads', ĝ's) learning rate is this times --lr (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    group.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the poly decay (default: 0)")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation (default: 0)")
    run = parser.add_argument_group("running (a run may be continued with other values of these)")
    run.add_argument("--out", required=True, help="output folder: new or empty, or this script's run there, to continue")
    run.add_argument("--resume", action="store_true", help="continue the run in --out with its recorded flags")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels-last memory format (default: on with CUDA, off on the CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of compiling first)")
    run.add_argument("--workers", type=int, default=common.default_workers(),
                     help="data-loading processes (default: %(default)s, from this machine's cores)")
    run.add_argument("--eval-every", type=int, default=0, help="also evaluate on val every N steps (default: at the end only)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
    run.add_argument("--print-every", type=int, default=20, help="progress line every N steps (default: %(default)s)")


RUNNING_FLAGS = ("out", "resume", "device", "amp", "channels_last", "compile", "workers", "eval_every", "save_every",
                 "print_every")


def start_run(parser, args, argv, script, reads=(), inputs=None):
    """Stages 1 and 3 before training: take --out (new, empty, or this script's run there, which the
    same command continues, and does not redo once finished); with --resume, the run's recorded
    flags for those not given; check the flags (--out outside the data and the folders of the
    flags `reads`); refuse to continue a run with another recipe, in which `inputs(args)` stands
    for the flags naming input files (by their content, so that folders may move); read the
    dataset; write the record. Returns
    (args, description, device, checkpoint or None), or None when the run in --out is finished."""
    record = common.open_output(args.out, "--out", script)
    if args.resume:
        if record is None:
            raise common.UserError(f"--resume: {args.out} holds no run of {script} to continue")
        parser.set_defaults(**{key: None for key in vars(args)})
        given = {key for key, value in vars(parser.parse_args(argv)).items() if value is not None}
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in record["args"].items()
                                                      if k not in given and k not in RUNNING_FLAGS}})
    common.check_finite_floats(args)
    for flag, value, low in [("crop_size", min(args.crop_size), common.MIN_SIDE), ("iters", args.iters or 1, 1),
                             ("save_every", args.save_every, 1), ("print_every", args.print_every, 1),
                             ("workers", args.workers, 0), ("warmup", args.warmup, 0), ("eval_every", args.eval_every, 0),
                             ("weight_decay", args.weight_decay, 0), ("head_lr_mult", args.head_lr_mult, 0)]:
        if value < low:
            raise common.UserError(f"--{flag.replace('_', '-')} {value}: it must be at least {low}")
    for flag, value in [("lr", args.lr), ("epochs", args.epochs or 1), ("image_scale", args.image_scale),
                        ("scale_range", args.scale_range[0])]:
        if value <= 0:
            raise common.UserError(f"--{flag.replace('_', '-')} {value}: it must be positive")
    if len(args.crop_size) > 2 or args.scale_range[0] > args.scale_range[1]:
        raise common.UserError("--crop-size takes one number or two (HEIGHT WIDTH), --scale-range MIN MAX with MIN <= MAX")
    for source in [args.data_root] + [getattr(args, flag) for flag in reads if getattr(args, flag)]:
        if common.is_inside(args.out, source):
            raise common.UserError(f"--out {args.out} is inside {source}, which this command reads; choose a folder outside it")
    flags = dict(vars(args))
    recipe = {**{k: v for k, v in flags.items() if k not in RUNNING_FLAGS}, "data_root": os.path.realpath(args.data_root),
              **(inputs(args) if inputs else {})}
    device = common.init_distributed_mode(args)
    if args.channels_last is None:  # the tensor cores' layout, on by default on a GPU
        args.channels_last = device.type == "cuda"
    description = common.describe_dataset(args.data_root)
    checkpoint = None
    if record is not None and os.path.exists(os.path.join(args.out, "checkpoint.pt")):  # else it just starts again
        common.check_same_recipe(record["recipe"], recipe, args.out,
                                 "use another --out, or the run's flags (or --resume) to continue it")
        if os.path.exists(os.path.join(args.out, "metrics.json")):
            print(f"{args.out} holds this run, finished (metrics.json): nothing to do")
            return None
        checkpoint, _ = common.load_checkpoint(args.out, "--out")
        print(f"continuing the run in {args.out} from step {checkpoint['step']}")
    if args.distributed:
        dist.barrier()  # every process has looked at --out before the first one writes there
    if common.is_main_process():
        common.write_record(args.out, "--out", {"script": script, "recipe": recipe, "args": flags})
    return args, description, device, checkpoint


def write_split(out, description, labeled, unlabeled):
    """The split files of a training run (labeled.txt, unlabeled.txt, val.txt), and its first lines:
    what the data holds, so that a wrong layout shows at once."""
    d, names = description, description.class_names
    if common.is_main_process():
        for name, ids in [("labeled", labeled), ("unlabeled", unlabeled), ("val", d.val_ids)]:
            common.write_text(os.path.join(out, f"{name}.txt"), "".join(f"{i}\n" for i in ids))
    print(f"{d.kind} data in {d.root}: {len(d.train_ids)} training images ({sum(bool(d.masks[i]) for i in d.train_ids)} "
          f"with a mask), {len(d.val_ids)} val images, {len(names)} classes", *d.notes, sep="\n")

    def pixels(image_id):
        mask = common.read_mask(d.masks[image_id], len(names), None, d.label_table, d.colours).numpy()
        return np.bincount(mask.ravel(), minlength=256)[:len(names)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counts = sum(pool.map(pixels, labeled), np.zeros(len(names), dtype=np.int64))
    print(f"this run: {len(labeled)} labelled and {len(unlabeled)} unlabelled training images; the classes' pixel shares "
          "in the labelled masks: " + ", ".join(f"{n} {100 * c / max(counts.sum(), 1):.1f}%" for n, c in zip(names, counts)))
    if not counts.all():
        print(f"note: the labelled masks have no pixel of {', '.join(n for n, c in zip(names, counts) if c == 0)}")


def shuffled_stream(size, seed, start=0, rank=0, world=1):
    """Indices forever: one seeded permutation of the dataset after another, so training counts
    steps, not epochs. Every process draws the same stream and takes every world-th index, so a
    step's batches across processes are the one-process batch; a continued run starts at `start`."""
    position = start
    while True:
        epoch, offset = divmod(position, size)
        for index in torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))[offset:].tolist():
            if position % world == rank:
                yield index
            position += 1


def train_loader(dataset, total_batch, workers, seed, start_step=0, rank=0, world=1):
    """An endless iterator of this process's share of each step's batch of `total_batch` images."""
    if total_batch % world:
        raise common.UserError(f"a batch of {total_batch} images cannot be shared by {world} processes; "
                               f"use a batch size divisible by {world} (README, 'Several GPUs')")
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=total_batch // world, sampler=shuffled_stream(len(dataset), seed, start_step * total_batch, rank, world),
        num_workers=workers, pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None))


def make_optimizer(model, args):
    """Backbone at --lr, new layers (heads, ĝ's stage) at --lr x --head-lr-mult; linear warm-up, then poly decay."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.startswith(model.NEW_LAYERS)], "lr": args.lr},
              {"params": [p for n, p in named if n.startswith(model.NEW_LAYERS)], "lr": args.lr * args.head_lr_mult}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup if args.warmup else 1.0) * (1 - step / args.iters) ** 0.9)


def prepare_model(model, args, device, find_unused_parameters=False):
    """The model as trained: on the device (channels-last where asked; cuDNN picks the fastest
    convolutions for the fixed crop), wrapped for several processes (batch norm synchronised on
    GPUs, so it sees the whole batch as one process would), compiled where asked. `model` keeps
    the weights and the state_dict keys."""
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if args.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if device.type == "cuda" else net
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=find_unused_parameters)
    return torch.compile(net) if args.compile else net


@torch.no_grad()
def val_confusion(model, loader, device, num_classes, scale=1.0, amp=False, head=0):
    """The confusion matrix of full-image predictions (head 1: the auxiliary head's), over all processes."""
    was_training = model.training
    model.eval()
    confusion = common.ConfusionMatrix(num_classes)
    for images, masks, _ in loader:
        images = common.images_to_device(images, device, channels_last=device.type == "cuda")
        confusion.update(masks.to(device, non_blocking=True), common.predict(model, images, scale, amp, head).argmax(1))
    confusion.matrix = common.sum_over_processes(confusion.matrix)
    model.train(was_training)
    return confusion


def check_finite(losses, step):
    for name, value in losses.items():
        value = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(value):
            raise common.UserError(f"{name} became {value} by step {step}; lower --lr (the last checkpoint is kept)")


class Progress:
    """Every --print-every steps a line (the losses averaged since the last line, learning rate,
    speed, time left), kept with every val evaluation in history.jsonl. Losses stay on the device
    between lines: reading them back waits for the GPU."""

    def __init__(self, out, step, iters, every):
        self.path = os.path.join(out, "history.jsonl") if common.is_main_process() else None
        self.iters, self.every, self.last_step, self.last_time, self.sums, self.count = iters, every, step, time.time(), {}, 0
        if self.path:  # a continued run drops what was written after its checkpoint
            kept = [line for line in common.read_lines(self.path) if json.loads(line)["step"] <= step] if step else []
            common.write_text(self.path, "".join(line + "\n" for line in kept))

    def update(self, step, losses, lr, **extra):
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.count += 1
        if step % self.every and step != self.iters:
            return
        now, means = time.time(), {name: (value / self.count).item() for name, value in self.sums.items()}
        check_finite(means, step)
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = datetime.timedelta(seconds=round((self.iters - step) / max(speed, 1e-9)))
        print(f"step {step}/{self.iters}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()) +
              f"  lr {lr:.2e}  {speed:.2f} it/s  eta {eta}" + "".join(f"  {k} {v}" for k, v in extra.items()), flush=True)
        self.log({"step": step, **means, "lr": lr, "it_per_s": speed, "time": now, **extra})
        self.last_step, self.last_time, self.sums, self.count = step, now, {}, 0

    def log(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
    run = start_run(parser, args, argv, "stage1_train.py")
    if run is None:
        return
    args, description, device, checkpoint = run
    if args.backbone != "tiny_unet" and args.batch_size < 2 * args.world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: DeepLabv3's image pooling normalises over the batch, "
                               f"so each of the {args.world_size} processes needs at least 2 images a step")
    torch.manual_seed(args.seed)
    random.seed(args.seed + args.rank)  # each process augments differently
    labeled, unlabeled = (checkpoint["labeled"], checkpoint["unlabeled"]) if checkpoint else make_split(description, args)
    write_split(args.out, description, labeled, unlabeled)
    if args.iters is None:
        args.iters = math.ceil((args.epochs * len(labeled) if args.epochs else IMAGES_SEEN) / args.batch_size)
    print(f"{args.iters} steps of {args.batch_size} on {device}" + (f" ({args.world_size} processes)" if args.distributed else ""))

    class_names = description.class_names
    model = common.build_model(args.backbone, len(class_names), args.weights)
    optimizer, scheduler = make_optimizer(model, args)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        step = checkpoint["step"]
    net = prepare_model(model, args, device)
    if checkpoint is not None:  # after the model is on the device: the optimiser's state follows it there
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])

    crop = (args.crop_size * 2)[:2]  # one number: a square
    scale_range = [args.image_scale * s for s in args.scale_range]  # relative to the image as read
    train_set = common.SegmentationDataset(description, labeled, augment(crop, scale_range, args.strong_aug))
    batches = train_loader(train_set, args.batch_size, args.workers, args.seed, step, args.rank, args.world_size)
    val_loader = common.full_image_loader(common.SegmentationDataset(description, description.val_ids), 8, args.workers,
                                          args.rank, args.world_size, args.image_scale)

    def validate():
        return val_confusion(model, val_loader, device, len(class_names), args.image_scale, args.amp)

    progress = Progress(args.out, step, args.iters, args.print_every)
    while step < args.iters:
        images, masks, _ = next(batches)
        loss = train_one_step(net, common.images_to_device(images, device, args.channels_last),
                              masks.to(device, non_blocking=True), optimizer, scheduler, args.amp)
        step += 1
        progress.update(step, {"loss": loss}, scheduler.get_last_lr()[0])
        if (step % args.save_every == 0 or step == args.iters) and common.is_main_process():
            check_finite({"loss": loss}, step)  # never save weights that have become NaN
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
