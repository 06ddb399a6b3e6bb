"""Stage 1 of Ke et al. (IEEE TIP 2022): supervised training of DeepLabv3 on the labelled images.

    python stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464
    torchrun --nproc-per-node 4 stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464

Writes to --out: checkpoint.pt (weights, arguments, split, step), labeled.txt, unlabeled.txt,
history.jsonl (every progress line and val evaluation) and metrics.json (val mIoU and per-class
IoU). An interrupted run continues with --resume. The default length is the authors' budget,
100,000 labelled images seen (10,000 steps of 10), whatever the label count.
"""
import argparse
import math
import os
import random

import torch
import torch.nn.functional as F

import common

IMAGES_SEEN = 100_000  # the authors' stage-1 budget: 10,000 steps of 10 images


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, default_out="runs/stage1",
                             default_length=f"{IMAGES_SEEN:,} images seen, the authors' budget: 6,250 at batch 16")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="labelled images per step, over all processes (default: %(default)s)")
    parser.add_argument("--strong-aug", action="store_true",
                        help="also give the labelled images the strong augmentation S of the multi-task stages "
                             "(the authors' RandAugment operations, warping the mask, and Cutout); off in the paper")
    args = parser.parse_args(argv)
    return parser, args


def supervised_loss(model, images, masks, amp):
    with common.autocast(images.device, amp):
        logits = model(images)
    return F.cross_entropy(logits.float(), masks, ignore_index=common.IGNORE)


def train_one_step(model, images, masks, optimizer, scheduler, amp):
    """One optimiser step; the loss stays on the device (reading it back would wait for the GPU)."""
    model.train()
    loss = supervised_loss(model, images, masks, amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {"loss": loss}


def step_flops(args, num_classes):
    """FLOPs of one step at the real shapes, counted on meta tensors (nothing is computed)."""
    with torch.device("meta"):
        model = common.build_model(args.backbone, num_classes, weights="none")
        images = torch.zeros(args.batch_size, 3, *common.crop_of(args))
        masks = torch.zeros(args.batch_size, *common.crop_of(args), dtype=torch.long)
    return common.count_flops(lambda: supervised_loss(model, images, masks, False).backward())


def main(argv=None):
    parser, args = get_args(argv)
    checkpoint_path = common.prepare_out_dir(args.out, args.resume)
    checkpoint = common.load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        args = common.resume_args(parser, args, checkpoint, common.RECIPE_FLAGS + ["batch_size", "strong_aug"], argv)
    common.check_training_args(args)
    description = common.describe_dataset(args.data_root)
    device = common.finish_running_args(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed + args.rank)  # the augmentation of each process differs

    class_names = description.class_names
    labeled, unlabeled = common.split_of_run(args, description, checkpoint)
    if args.iters is None:
        images = args.epochs * len(labeled) if args.epochs else IMAGES_SEEN
        args.iters = math.ceil(images / args.batch_size)
    if common.is_main_process():
        common.write_ids(os.path.join(args.out, "labeled.txt"), labeled)
        common.write_ids(os.path.join(args.out, "unlabeled.txt"), unlabeled)
    print(f"{description.name}: {len(labeled)} labelled and {len(unlabeled)} unlabelled training images, "
          f"{len(class_names)} classes; {args.iters} steps of {args.batch_size} on {device}"
          + (f" ({args.world_size} processes)" if args.distributed else ""))

    model = common.build_model(args.backbone, len(class_names), args.weights)
    optimizer, scheduler = common.make_optimizer(model, args)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        step = checkpoint["step"]
    net = common.prepare_model(model, args, device)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        print(f"resuming {checkpoint_path} at step {step}")

    train_set = common.true_mask_dataset(description, labeled, common.labeled_augment(
        common.crop_of(args), common.train_scale_range(args), args.strong_aug))
    batches = common.train_batches(train_set, args.batch_size, args.workers, args.seed, start_step=step)
    val_loader = common.full_image_loader(common.val_dataset(description), 8, args.workers)

    def validate():
        return common.evaluate(model, val_loader, device, len(class_names), args.amp, image_scale=args.image_scale)

    def save(step):
        common.save_on_master(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "args": vars(args), "labeled": labeled, "unlabeled": unlabeled,
            "class_names": class_names, "dataset": description.name, "stage": 1})

    history = common.History(args.out, step if checkpoint is not None else None)
    flops = step_flops(args, len(class_names)) // args.world_size if device.type == "cuda" else None
    progress = common.Progress(step, args.iters, flops, common.peak_flops(device, args.amp))
    while step < args.iters:
        images, masks, _ = next(batches)
        losses = train_one_step(net, common.to_device(images, device, args.channels_last), common.to_device(masks, device),
                                optimizer, scheduler, args.amp)
        progress.add(losses)
        step += 1
        if step % args.print_every == 0 or step == args.iters:
            text, record = progress.line(step, scheduler.get_last_lr()[0])
            common.check_finite(record, step)
            print(text, flush=True)
            history.append(record)
        if step % args.save_every == 0 or step == args.iters:
            common.check_finite({name: value.item() for name, value in losses.items()}, step)
            save(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.iters:
            miou = validate().miou()
            print(f"step {step}: val mIoU {miou:.2f}")
            history.append({"step": step, "val_miou": miou})

    confusion = validate()
    print(f"val IoU after {step} steps:\n{confusion.table(class_names)}")
    history.append({"step": step, "val_miou": confusion.miou()})
    if common.is_main_process():
        common.write_json(os.path.join(args.out, "metrics.json"), {"step": step, **confusion.report(class_names)})


if __name__ == "__main__":
    common.run_main(main)
