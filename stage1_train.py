"""Stage 1 of Ke et al. (IEEE TIP 2022): supervised training of DeepLabv3 on the labelled images.

    python stage1_train.py --data-root data/VOCdevkit/VOC2012 --labeled 1464

Writes to --out: checkpoint.pt (weights, arguments, split, step), labeled.txt, unlabeled.txt and
metrics.json (val mIoU and per-class IoU). An interrupted run continues with --resume.
"""
import argparse
import math
import os
import random

import torch
import torch.nn.functional as F

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, default_out="runs/stage1")
    parser.add_argument("--batch-size", type=int, default=16, help="labelled images per step (default: %(default)s)")
    args = parser.parse_args(argv)
    return parser, args


def train_one_step(model, images, masks, optimizer, scheduler, device, amp):
    model.train()
    with common.autocast(device, amp):
        logits = model(images.to(device, non_blocking=True))
    loss = F.cross_entropy(logits.float(), masks.to(device, non_blocking=True), ignore_index=common.IGNORE)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def main(argv=None):
    parser, args = get_args(argv)
    checkpoint_path = common.prepare_out_dir(args.out, args.resume)
    checkpoint = common.load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        args = common.resume_args(parser, args, checkpoint, common.RECIPE_FLAGS + ["batch_size"], argv)
    common.check_training_args(args)
    common.check_data_root(args.data_root)
    device = common.pick_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    class_names = common.read_class_names(args.data_root)
    labeled, unlabeled = common.split_of_run(args, checkpoint)
    if args.iters is None:
        args.iters = math.ceil(args.epochs * len(labeled) / args.batch_size)
    common.write_ids(os.path.join(args.out, "labeled.txt"), labeled)
    common.write_ids(os.path.join(args.out, "unlabeled.txt"), unlabeled)
    print(f"{len(labeled)} labelled and {len(unlabeled)} unlabelled training images, {len(class_names)} classes; "
          f"{args.iters} steps of {args.batch_size} on {device}")

    train_set = common.SegmentationDataset(
        args.data_root, labeled, len(class_names), lambda i: common.train_mask_path(args.data_root, i),
        transform=common.labeled_augment(args.crop_size, args.scale_range, args.strong_aug))
    batches = common.infinite(common.train_loader(train_set, args.batch_size, args.workers))
    val_loader = common.full_image_loader(common.val_dataset(args.data_root, len(class_names)), 1, args.workers)

    model = common.build_model(args.backbone, len(class_names), pretrained=not args.no_pretrained).to(device)
    optimizer, scheduler = common.make_optimizer(model, args)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step = checkpoint["step"]
        print(f"resuming {checkpoint_path} at step {step}")

    def save(step):
        common.save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "args": vars(args), "labeled": labeled, "unlabeled": unlabeled,
            "class_names": class_names, "stage": 1})

    progress = common.Progress(step, args.iters)
    while step < args.iters:
        images, masks, _ = next(batches)
        loss = train_one_step(model, images, masks, optimizer, scheduler, device, args.amp)
        step += 1
        if not math.isfinite(loss):
            raise SystemExit(f"error: the loss became {loss} at step {step}; lower --lr (the last checkpoint is kept)")
        if step % args.print_every == 0 or step == args.iters:
            print(progress.line(step, {"loss": loss}, scheduler.get_last_lr()[0]), flush=True)
        if step % args.save_every == 0 or step == args.iters:
            save(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.iters:
            print(f"step {step}: val mIoU {common.evaluate(model, val_loader, device, len(class_names), args.amp).miou():.2f}")

    confusion = common.evaluate(model, val_loader, device, len(class_names), args.amp)
    print(f"val IoU after {step} steps:\n{confusion.table(class_names)}")
    common.write_json(os.path.join(args.out, "metrics.json"), {"step": step, **confusion.report(class_names)})


if __name__ == "__main__":
    common.run_main(main)
