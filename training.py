"""The training run that stages 1 and 3 share: its flags, its start (the output folder, the record, the data, the
split files), the data stream, the optimiser, the model as trained, checkpoints, progress and validation, and the
augmentation: the weak view, and the authors' strong augmentation S with the warp that moves targets as S moved the
image. Each stage's own data, step and loop are in its script."""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import random
import textwrap
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision import tv_tensors
from torchvision.transforms import v2

import common
import outputs
from common import UserError


# ============================================================================= flags and the start of a run

def add_training_args(parser, default_length):
    """The model, optimisation and running flags that stages 1 and 3 share."""
    group = parser.add_argument_group("model and training")
    group.add_argument("--backbone", choices=common.BACKBONES, default="resnet101",
                       help="DeepLabv3 backbone at output stride 8; tiny_unet is the CPU demo's (default: %(default)s)")
    group.add_argument("--weights", choices=["imagenet", "coco", "none"], default="imagenet",
                       help="the backbone's start: torchvision's ImageNet weights (the field's protocol), its "
                            "COCO-trained DeepLabv3 (the paper's setting on VOC), or none (default: %(default)s)")
    group.add_argument("--no-pretrained", dest="weights", action="store_const", const="none",
                       help="the same as --weights none")
    group.add_argument("--image-scale", type=float, default=1.0,
                       help="resize every image by this factor, in training, pseudo-labelling and evaluation (0.5 on "
                            "Cityscapes: the authors' 1024x512) (default: %(default)s)")
    group.add_argument("--crop-size", type=int, nargs="+", default=[321], metavar="SIZE",
                       help="training crop: one number for a square, or HEIGHT WIDTH (default: 321)")
    group.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 1.5], metavar=("MIN", "MAX"),
                       help="random rescaling of the image before cropping, the authors' (default: 0.5 1.5)")
    group.add_argument("--iters", type=int, help=f"optimiser steps (default: {default_length})")
    group.add_argument("--epochs", type=float, help="passes over the training stream, instead of --iters")
    group.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                       help="sgd: momentum 0.9, the DeepLab recipe; adamw: for training from scratch "
                            "(default: %(default)s)")
    group.add_argument("--lr", type=float, default=0.001, help="learning rate of the backbone (default: %(default)s)")
    group.add_argument("--head-lr-mult", type=float, default=10.0,
                       help="the new layers' (heads', ĝ's) learning rate is this times --lr (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    group.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the poly decay (default: 0)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of initialisation, data order and augmentation (default: 0)")
    run = parser.add_argument_group("running (a run may be continued with other values of these)")
    run.add_argument("--out", required=True,
                     help="output folder: new or empty, or this script's run there, to continue")
    run.add_argument("--resume", action="store_true", help="continue the run in --out with its recorded flags")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels-last memory format (default: on with CUDA, off on the CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of compiling first)")
    run.add_argument("--workers", type=int, default=common.default_workers(),
                     help="data-loading processes (default: %(default)s, from this machine's cores)")
    run.add_argument("--eval-every", type=int, default=0,
                     help="also evaluate on val every N steps (default: at the end only)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
    run.add_argument("--print-every", type=int, default=20, help="progress line every N steps (default: %(default)s)")


RUN_FILES = [outputs.RECORD, "checkpoint.pt", "history.jsonl", "metrics.json", "labeled.txt", "unlabeled.txt",
             "val.txt", outputs.ROUNDS]  # what a training run writes in --out
RUNNING_FLAGS = ("out", "resume", "device", "amp", "channels_last", "compile", "workers", "eval_every", "save_every",
                 "print_every")
POSITIVE = ("iters", "epochs", "lr", "image_scale", "scale_range", "crop_size", "save_every", "print_every",
            "batch_size", "labeled", "batch_labeled", "batch_unlabeled")  # for check_numbers, in both stages
AT_LEAST_ZERO = ("warmup", "eval_every", "weight_decay", "head_lr_mult", "workers", "seed", "split_seed", "w_sup",
                 "w_con", "ema_decay")


def parse_args(parser, argv, script):
    """The flags, their numbers checked. With --resume, the run's recorded flags stand in for those not given:
    argparse sets a flag's default only where the namespace it is handed holds no value yet."""
    out_and_resume = argparse.ArgumentParser(add_help=False)
    out_and_resume.add_argument("--out")
    out_and_resume.add_argument("--resume", action="store_true")
    first, _ = out_and_resume.parse_known_args(argv)
    recorded = {}
    if first.resume and first.out:
        if not os.path.isfile(os.path.join(first.out, outputs.RECORD)):
            raise UserError(f"--resume: {first.out} holds no run of {script} to continue")
        record = outputs.read_record(first.out, "--out", script)
        recorded = {key: value for key, value in record["args"].items() if key not in RUNNING_FLAGS}
    args = parser.parse_args(argv, namespace=argparse.Namespace(**recorded))
    common.check_numbers(args, POSITIVE, AT_LEAST_ZERO)  # before any work
    return args


def start_run(args, script, make_split, reads=(), inputs=None, val_from=None):
    """Stages 1 and 3 before training, in this order so that a refusal leaves nothing behind: check the flags;
    take --out (new, empty, or this script's run there, which the same command continues, and does not redo once
    finished), apart from the data and the input folders or files in `reads` (a checkpoint file: its folder); refuse
    to continue a run of another recipe, in which `inputs(args)` stands for the flags naming input files (by their
    content, so that folders may move); read the dataset; make the split, make_split(description, checkpoint or
    None) -> (labeled, unlabeled, {id: labelling round}), and check it and every labelled and val mask; then write
    the record and the split files. Where the data has no val list of its own, val is that of the run continued in
    --out, else that of the run folder val_from (stage 3's pseudo-masks, stage 1's --add-labeled). Returns (args,
    description, device, checkpoint or None, split), or None when the run in --out is finished."""
    if min(args.crop_size) < common.MIN_SIDE or len(args.crop_size) > 2:
        raise UserError(f"--crop-size {' '.join(map(str, args.crop_size))}: one number or two (HEIGHT WIDTH), "
                        f"each at least {common.MIN_SIDE}")
    if args.scale_range[0] > args.scale_range[1]:
        raise UserError("--scale-range MIN MAX: MIN must not be above MAX")
    sources = [args.data_root] + [outputs.input_folder(path) for path in reads if path]
    record = outputs.open_output(args.out, "--out", script, reads=sources,
                                 own_files=[os.path.join(args.out, name) for name in RUN_FILES])
    flags = dict(vars(args))
    recipe = {**{k: v for k, v in flags.items() if k not in RUNNING_FLAGS},
              "data_root": os.path.realpath(args.data_root),
              **(inputs(args) if inputs else {})}
    device = common.init_distributed_mode(args)
    if args.channels_last is None:  # the tensor cores' layout, on by default on a GPU
        args.channels_last = device.type == "cuda"
    continuing = record is not None and os.path.exists(os.path.join(args.out, "checkpoint.pt"))  # else: starts again
    run_val = outputs.val_of_run(args.out if continuing else val_from, args.data_root)
    description = common.describe_dataset(args.data_root, run_val=run_val)
    checkpoint = None
    if continuing:
        outputs.check_same_recipe(record["recipe"], recipe, args.out,
                                  "use another --out, or the run's flags (or --resume) to continue it")
        if os.path.exists(os.path.join(args.out, "metrics.json")):
            print(f"{args.out} holds this run, finished (metrics.json): nothing to do")
            return None
        checkpoint = checkpoint_to_continue(args, description)
    split = make_split(description, checkpoint)
    describe_data(description, *split)
    if args.distributed:
        dist.barrier()  # every process has looked at --out before the first one writes there
    if common.is_main_process():
        outputs.write_json(os.path.join(args.out, outputs.RECORD), {"script": script, "recipe": recipe, "args": flags})
        labeled, unlabeled, rounds = split
        outputs.write_ids(args.out, {"labeled": labeled, "unlabeled": unlabeled, "val": description.val_ids})
        outputs.write_rounds(args.out, labeled, rounds)
    step = checkpoint["step"] if checkpoint else 0
    outputs.interrupt_note = (f"the same command continues from step {step}, the last checkpoint" if step else
                              f"no checkpoint yet (one every --save-every {args.save_every} steps): the same command "
                              "starts the run again")
    return args, description, device, checkpoint, split


def split_of(checkpoint):
    """The split a run's checkpoint trained with: (labeled, unlabeled, {id: labelling round})."""
    return checkpoint["labeled"], checkpoint["unlabeled"], checkpoint.get("labeled_rounds", {})


def checkpoint_to_continue(args, description):
    """The checkpoint of the interrupted run in --out, which must be of this run's model."""
    checkpoint, path = outputs.load_checkpoint(args.out, "--out")
    held = (checkpoint["args"].get("backbone"), checkpoint["args"].get("aux_head"), len(checkpoint["class_names"]))
    if held != (args.backbone, getattr(args, "aux_head", None), len(description.class_names)):
        raise UserError(f"{path} holds a {held[0]} model of {held[2]} classes (auxiliary head: {held[1]}), "
                        "not this run's; it is not the run's checkpoint: move it away or use another --out")
    if checkpoint["class_names"] != description.class_names:
        changed = next(f"{a!r} is now {b!r}" for a, b in zip(checkpoint["class_names"], description.class_names)
                       if a != b)
        raise UserError(f"{path} was trained with other classes than {description.root}'s class list gives now "
                        f"({changed}); restore the class list, or train anew into another --out")
    print(f"continuing the run in {args.out} from step {checkpoint['step']}")
    return checkpoint


def describe_data(description, labeled, unlabeled, rounds):
    """A training run's first lines: what the data and the split hold, so that a wrong layout shows at once. Every
    training and val image (all of its file) and every labelled and val mask are read here, and the other masks'
    sizes, so that a bad one stops the run before training rather than after it (or in the next stage)."""
    d, names = description, description.class_names
    common.check_not_val(d, labeled + unlabeled, "this run's split")
    outputs.check_names(labeled + unlabeled + d.val_ids)
    masked = sum(bool(d.masks[i]) for i in d.train_ids)
    print(f"{d.kind} data in {d.root}: {len(d.train_ids)} training images ({masked} with a mask, "
          f"{len(d.train_ids) - masked} without), {len(d.val_ids)} val images, {len(names)} classes", *d.notes,
          sep="\n")
    added = sum(rounds.get(i, 1) > 1 for i in labeled)
    print(f"this run: {len(labeled)} labelled and {len(unlabeled)} unlabelled training images"
          + (f" ({added} labelled in later rounds: {outputs.ROUNDS})" if added else ""))

    def pixels(image_id):
        size = common.image_size(d.images[image_id], read_all=True)  # a mask of another size stops it now too
        mask = common.read_mask(d.masks[image_id], len(names), size, d.label_table, d.colours).numpy()
        return np.bincount(mask.ravel(), minlength=256)
    def check_unlabelled(image_id):  # as stage 2 reads it: the image, and the size of a true mask it measures against
        size, mask = common.image_size(d.images[image_id], read_all=True), d.masks.get(image_id)
        if mask and common.image_size(mask) != size:
            common.read_mask(mask, len(names), size, d.label_table, d.colours)  # says which sizes differ
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(check_unlabelled, unlabeled))
        for what, ids in [("labelled", labeled), ("val", d.val_ids)]:
            counts = sum(pool.map(pixels, ids), np.zeros(256, dtype=np.int64))
            total = max(counts.sum(), 1)
            shares = ", ".join(f"{n} {100 * c / total:.1f}%" for n, c in zip(names, counts))
            print(textwrap.fill(f"pixels of the {len(ids)} {what} masks: {shares}; ignored (255): "
                                f"{100 * counts[common.IGNORE] / total:.1f}%", 116, subsequent_indent="  "))
            if not counts[:common.IGNORE].any():
                raise UserError(f"every pixel of the {len(ids)} {what} masks is {common.IGNORE} (ignore): there is "
                                f"nothing to {'learn' if what == 'labelled' else 'measure'}; check the masks and the "
                                "class list's values")
            absent = [n for n, c in zip(names, counts) if c == 0]
            if absent and what == "labelled":
                print(textwrap.fill(f"note: the labelled masks have no pixel of {', '.join(absent[:10])}"
                                    + (f" (and {len(absent) - 10} more)" if len(absent) > 10 else ""), 116,
                                    subsequent_indent="  "))


# ============================================================================= data, model, optimiser

class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose every sample draws its random augmentation from a seed of its own, which the stream hands
    it with its index: the k-th sample of a run is the same in a run resumed at any step and with any number of
    loader processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        state = random.getstate()
        random.seed(seed)
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's generator
            torch.manual_seed(seed)
            sample = self.dataset[index]
        random.setstate(state)
        return sample


def shuffled_stream(size, seed, start=0, rank=0, world=1):
    """(index, sample seed) forever: one seeded permutation of the dataset after another, so training counts
    steps, not epochs. Every process draws the same stream and takes every world-th index, so a step's batches
    across processes are the one-process batch; a continued run starts at `start`."""
    position = start
    while True:
        epoch, offset = divmod(position, size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for index in order[offset:].tolist():
            if position % world == rank:
                yield index, random.Random(f"{seed} {position}").getrandbits(63)
            position += 1


def train_loader(dataset, total_batch, workers, seed, start_step=0, rank=0, world=1):
    """An endless iterator of this process's share of each step's batch of `total_batch` images."""
    if total_batch % world:
        raise UserError(f"a batch of {total_batch} images cannot be shared by {world} processes; "
                        f"use a batch size divisible by {world} (README, 'Several GPUs')")
    stream = shuffled_stream(len(dataset), seed, start_step * total_batch, rank, world)
    return iter(torch.utils.data.DataLoader(  # its own generator: the global one is the model's (dropout), saved
        SeededSamples(dataset), batch_size=total_batch // world, sampler=stream, num_workers=workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None, generator=torch.Generator()))


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
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup if args.warmup else 1.0)
        * (1 - step / args.iters) ** 0.9)


def prepare_model(model, args, device, find_unused_parameters=False):
    """The model as trained: on the device (channels-last where asked; cuDNN picks the fastest convolutions for
    the fixed crop), wrapped for several processes (batch norm synchronised on GPUs, so it sees the whole batch as
    one process would), compiled where asked. unwrapped() gives back the model inside."""
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=find_unused_parameters)
    return torch.compile(model) if args.compile else model


def unwrapped(model):
    """The model inside torch.compile's and DistributedDataParallel's wrappers: its weights, its state_dict keys."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def restore(checkpoint, out, modules, optimizer, scheduler):
    """The step to start at: 0, or with the checkpoint of the run in `out` to continue, its step, its state
    restored: weights ({key: module}), optimiser, schedule and the random state (the model's dropout draws from
    it); after the model is on its device, so the optimiser's state follows it there."""
    if checkpoint is None:
        return 0
    path = os.path.join(out, "checkpoint.pt")
    try:
        for key, module in modules.items():
            module.load_state_dict(checkpoint[key])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, RuntimeError, ValueError):
        raise UserError(f"{path} does not fit this run's model; it is damaged or of another version: move it "
                        "away to start again") from None
    if "rng_state" in checkpoint:
        torch.set_rng_state(checkpoint["rng_state"])
        if torch.cuda.is_available() and "cuda_rng_state" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])
    return checkpoint["step"]


# ============================================================================= progress, validation

def check_batch(args, images, flags):
    """DeepLabv3's image pooling normalises over the batch: each process needs two images a step at least."""
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; checked before the processes meet
    if args.backbone != "tiny_unet" and images < 2 * processes:
        raise UserError(f"{flags} {images}: DeepLabv3's image pooling normalises over the batch, so each of the "
                        f"{processes} processes needs at least 2 images a step")


def val_loader(description, args):
    """The val images, whole, in batches of 8 of one size, every process its share."""
    return common.full_image_loader(common.SegmentationDataset(description, description.val_ids), 8, args.workers,
                                    args.rank, args.world_size, args.image_scale)


@torch.no_grad()
def validate(model, loader, args, device, num_classes, heads=(0,)):
    """The confusion matrices of full-image predictions on val, over all processes: of the main head (0) and, in
    the multi-task stages, of the auxiliary head (1)."""
    was_training, confusions = model.training, []
    model.eval()
    for head in heads:
        confusion = common.ConfusionMatrix(num_classes)
        for images, masks, _ in loader:
            images = common.images_to_device(images, device, channels_last=device.type == "cuda")
            predictions = common.image_probs(model, images, args.image_scale, args.amp, head).argmax(1)
            confusion.update(masks.to(device, non_blocking=True), predictions)
        confusion.matrix = common.sum_over_processes(confusion.matrix)
        confusions.append(confusion)
    model.train(was_training)
    return confusions


def after_step(args, step, losses, save, validate_now, progress):
    """The loop's tail in stages 1 and 3: a checkpoint every --save-every steps and at the last one (never of
    weights that have become NaN), a val evaluation every --eval-every steps (the last step's is the final one)."""
    if (step % args.save_every == 0 or step == args.iters) and common.is_main_process():
        check_finite(losses, step)
        save(step)
    if args.eval_every and step % args.eval_every == 0 and step < args.iters:
        main, *aux = validate_now()
        print(f"step {step}: {'teacher ' if aux else ''}val mIoU {main.miou():.2f}"
              + "".join(f" (auxiliary head {c.miou():.2f})" for c in aux))
        progress.log({"step": step, "val_miou": main.miou(), **{"aux_val_miou": c.miou() for c in aux}})


def final_report(args, step, confusions, progress, class_names):
    """The last val evaluation: printed, kept in history.jsonl and in metrics.json; with an auxiliary head's (the
    multi-task stages, which evaluate their teacher), its mIoU too."""
    main, *aux = confusions
    print(("teacher's main head, " if aux else "") + f"val IoU after {step} steps:\n"
          + common.iou_table(main, class_names))
    for c in aux:
        print(f"teacher's auxiliary head ({args.aux_head}): val mIoU {c.miou():.2f}")
    progress.log({"step": step, "val_miou": main.miou(), **{"aux_val_miou": c.miou() for c in aux}})
    if common.is_main_process():
        outputs.write_json(os.path.join(args.out, "metrics.json"),
                           {"step": step, **main.report(class_names), **{"aux_miou": c.miou() for c in aux}})


def check_finite(losses, step):
    """Stop a run whose training diverged; its flags are its record's, so a lower --lr is a new run."""
    for name, value in losses.items():
        value = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(value):
            raise UserError(f"{name} became {value} by step {step}: the training diverged; train again with a lower "
                            "--lr, into another --out")


class Progress:
    """Every --print-every steps a line (the losses averaged since the last line, learning rate, speed, time
    left), kept with every val evaluation in history.jsonl. Losses stay on the device between lines: reading them
    back waits for the GPU."""

    def __init__(self, out, step, iters, every):
        self.path = os.path.join(out, "history.jsonl") if common.is_main_process() else None
        self.iters, self.every, self.last_step, self.last_time = iters, every, step, time.time()
        self.sums, self.count = {}, 0
        if self.path:  # a continued run drops what was written after its checkpoint
            kept = [line for line in common.read_lines(self.path) if json.loads(line)["step"] <= step] if step else []
            outputs.write_text(self.path, "".join(line + "\n" for line in kept))

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
              f"  lr {lr:.2e}  {speed:.2f} it/s  eta {eta}" + "".join(f"  {k} {v}" for k, v in extra.items()),
              flush=True)
        self.log({"step": step, **means, "lr": lr, "it_per_s": speed, "time": now, **extra})
        self.last_step, self.last_time, self.sums, self.count = step, now, {}, 0

    def log(self, record):
        try:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(outputs.json_text(record, indent=None))
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}; free space on its disk, then run the same "
                            "command again") from None


# ============================================================================= augmentation

def weak_augment(crop_size, scale_range):
    """The weak view, moving an image and its masks alike: random scale, crop (masks padded with 255), flip."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: common.IGNORE}
    crop_and_flip = v2.Compose([v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill), v2.RandomHorizontalFlip()])

    def transform(image, *masks):
        scale = random.uniform(*scale_range)
        if scale != 1:  # masks: nearest
            size = [max(1, round(side * scale)) for side in image.shape[-2:]]
            image, *masks = [v2.functional.resize(x, size, antialias=True) for x in (image, *masks)]
        return crop_and_flip(image, *masks)
    return transform


# The authors' S (their randaugment_seg.py): the 14 operations of RandAugment. Levels are 1-9 of 10.
STRONG_OPERATIONS = ["Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast", "Brightness",
                     "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize"]
GREY = 127  # what the authors' S fills with: 0 in their [-1, 1] image range


def strong_augment(image, num_ops=3, cutouts=3):
    """The authors' S: `num_ops` operations drawn with replacement, each applied with probability 0.5 at a level
    of 1-9 (at most: Rotate 27 degrees, Shear 0.27, Translate 9 pixels at crop 321, either sign), then `cutouts`
    grey squares of 32 pixels at crop 321. Returns (image, source): source[y, x] is the flat input index of the
    pixel that landed at (y, x), -1 if from outside; warp() moves targets by it."""
    fn = v2.functional
    height, width = image.shape[-2:]
    crop_scale = math.sqrt(height * width) / 321
    source = tv_tensors.Mask(torch.arange(height * width).reshape(height, width))
    for name in random.choices(STRONG_OPERATIONS, k=num_ops):
        level, sign = random.randint(1, 9), random.choice([-1, 1])
        if random.random() >= 0.5 or name == "Identity":
            continue
        if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            shear = math.degrees(math.atan(sign * level * 0.03))
            geometry = {"Rotate": dict(angle=sign * int(level * 3)),
                        "ShearX": dict(shear=[shear, 0.0], center=[0, 0]),
                        "ShearY": dict(shear=[0.0, shear], center=[0, 0]),
                        "TranslateX": dict(translate=[sign * round(level * crop_scale), 0]),
                        "TranslateY": dict(translate=[0, sign * round(level * crop_scale)])}[name]
            # Nearest, as the authors' PIL operations; it also keeps the source map exact.
            params = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                          interpolation=v2.InterpolationMode.NEAREST) | geometry
            image, source = fn.affine(image, **params, fill=GREY), fn.affine(source, **params, fill=-1)
        elif name in ("AutoContrast", "Equalize"):
            image = fn.autocontrast(image) if name == "AutoContrast" else fn.equalize(image)
        elif name == "Solarize":
            image = fn.solarize(image, threshold=256 - int(level * 25.6))
        elif name == "Posterize":
            image = fn.posterize(image, bits=4 - int(level * 0.4))
        else:  # PIL's enhancers at a factor of 0.28-1.72
            adjust = {"Color": fn.adjust_saturation, "Contrast": fn.adjust_contrast,
                      "Brightness": fn.adjust_brightness, "Sharpness": fn.adjust_sharpness}[name]
            image = adjust(image, level * 0.18 + 0.1)
    image = image.clone()
    side = max(1, round(32 * crop_scale))
    for _ in range(cutouts):  # centres anywhere, squares clipped at the border, as the authors'
        y, x = random.randrange(height), random.randrange(width)
        image[..., max(0, y - side // 2):y + side // 2, max(0, x - side // 2):x + side // 2] = GREY
    return image, source.as_subclass(torch.Tensor)


def warp(target, source):
    """A target (H, W) or (N, H, W) of the unwarped view moved by S's source map; 255 where it came from outside."""
    moved = target.flatten(-2).gather(-1, source.clamp(min=0).flatten(-2).to(target.device)).view(source.shape)
    return moved.masked_fill(source.to(moved.device) < 0, common.IGNORE)
