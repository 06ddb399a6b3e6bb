"""Pseudo-masks for every training image of a checkpoint's split (labelled and unlabelled), with
their quality against the true masks, their uncertainty and a picture of some of them.

    python stage2_pseudolabel.py --checkpoint runs/stage1 --out runs/pseudo1
    python stage2_pseudolabel.py --checkpoint runs/stage3 --out runs/pseudo3 --previous runs/pseudo1 runs/pseudo2
    torchrun --nproc-per-node 4 stage2_pseudolabel.py --checkpoint runs/stage1 --out runs/pseudo1

--checkpoint is a checkpoint.pt of stage 1 or 3, or its run folder. Each pseudo-mask is the
argmax of the main head (the mean teacher's, for a multi-task checkpoint), full image, at the
scale the model was trained at, written as <out>/<id>.png: a palette PNG of class indices at the
image's original size. On Cityscapes the ego vehicle's region (found in the labelled images'
masks) is 255. <out>/labeled.txt and unlabeled.txt are the checkpoint's split, which
stage3_multitask.py trains with. <out>/stats.json holds the figures the script prints:
  - quality: mIoU and per-class IoU of the pseudo-masks against the true masks, wherever a true
    mask exists, for the unlabelled and the labelled images separately;
  - uncertainty: mean max-probability, mean per-pixel entropy (nats; at most ln C), the share of
    pixels whose max-probability is at least 0.9, a histogram of max-probability, and a
    reliability table: the accuracy of the pseudo-mask pixels by max-probability bin, where a
    true mask exists, with the expected calibration error (ECE).
<out>/preview.png shows a fixed choice of unlabelled images (the same in every round of a run):
the image, its true mask, the pseudo-masks of the --previous rounds and of this one and, with
--save-confidence, the confidence. The same command again finishes an interrupted run; a folder
of another checkpoint's pseudo-masks is refused, unless --overwrite, which removes only what this
script wrote there.
"""
import argparse
import collections
import concurrent.futures
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms import v2

import common
import evaluate  # the checkpoint's model and the overlays, as evaluate.py predicts

BINS = 10  # of max-probability over [0, 1]
CONFIDENT = 0.9
SCRIPT = "stage2_pseudolabel.py"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of stage 1 or stage 3, or its run folder")
    parser.add_argument("--out", required=True, help="folder for the pseudo-masks, new or this script's, e.g. runs/pseudo1")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--previous", nargs="+", default=[], metavar="DIR",
                        help="the pseudo-masks of earlier rounds of the same run: shown beside this round in "
                             "preview.png and in a table of the rounds")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass; only same-size images share one (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes, and threads writing the files (default: %(default)s)")
    parser.add_argument("--save-confidence", action="store_true",
                        help="also write confidence/<id>.png, the max-probability map (uint8, 255 = 1.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the pseudo-masks of another checkpoint that this script wrote in --out")
    return parser.parse_args(argv)


def batch_stats(probs, targets, num_classes, ignore_region=None):
    """The pseudo-masks of a batch (N, H, W; ignore_region set to 255), their max-probability and
    each image's figures as a row: the confusion matrix against the truth; pixels, sum of
    max-probability, sum of entropy, confident pixels, has-truth; then by max-probability bin:
    pixels, pixels with truth, correct pixels, and the sum of max-probability over the pixels with
    truth. All on the device, so that a batch is read back at once."""
    n, c = probs.shape[:2]
    max_prob, prediction = probs.max(1)
    if ignore_region is not None:
        prediction[:, ignore_region] = common.IGNORE
    entropy = torch.special.entr(probs).sum(1)  # -p ln p, summed over the classes
    judged = (targets != common.IGNORE) & (prediction != common.IGNORE)  # a true label, outside the ignore region
    bins = (max_prob * BINS).long().clamp(max=BINS - 1)
    image = torch.arange(n, device=probs.device).view(n, 1, 1).expand_as(prediction)

    def per_image(keys, size, where=None, weights=None):
        """A histogram of keys (0..size-1) for each image, over the pixels `where`."""
        where = torch.ones_like(judged) if where is None else where
        weights = None if weights is None else weights[where].double()
        return torch.bincount((image * size + keys)[where], weights, minlength=n * size).view(n, size).double()
    rows = [per_image(targets.long() * c + prediction.long(), c * c, judged),
            torch.full((n, 1), prediction[0].numel(), dtype=torch.float64, device=probs.device),
            max_prob.double().sum((1, 2))[:, None], entropy.double().sum((1, 2))[:, None],
            (max_prob >= CONFIDENT).sum((1, 2))[:, None].double(), judged.flatten(1).any(1)[:, None].double(),
            per_image(bins, BINS), per_image(bins, BINS, judged), per_image(bins, BINS, judged & (prediction == targets)),
            per_image(bins, BINS, judged, max_prob)]
    return prediction, max_prob, torch.cat(rows, 1)


def summarize(out, labeled, unlabeled, class_names):
    """stats.json's groups from the per-image figures of every pseudo-mask in the folder."""
    n = len(class_names)
    groups = {}
    for group, ids in [("unlabeled", unlabeled), ("labeled", labeled)]:
        rows = np.stack([np.load(os.path.join(out, "image_stats", f"{i}.npy")) for i in ids]) if ids else np.zeros((0, n * n + 5 + 4 * BINS))
        confusion = common.ConfusionMatrix(n)
        confusion.matrix = torch.from_numpy(rows[:, :n * n].sum(0).reshape(n, n).round().astype(np.int64))
        pixels, sum_max_prob, sum_entropy, confident, with_truth = rows[:, n * n:n * n + 5].sum(0)
        histogram, truth, correct, truth_prob = rows[:, n * n + 5:].sum(0).reshape(4, BINS)
        reliability = [{"bin": [b / BINS, (b + 1) / BINS], "share_of_pixels": t / max(truth.sum(), 1),
                        "mean_max_prob": p / t if t else None, "accuracy": c / t if t else None}
                       for b, (t, c, p) in enumerate(zip(truth, correct, truth_prob))]
        groups[group] = {
            "images": len(ids), "images_with_truth": int(with_truth), **confusion.report(class_names),
            "mean_max_prob": sum_max_prob / max(pixels, 1), "mean_entropy": sum_entropy / max(pixels, 1),
            "confident_share": confident / max(pixels, 1), "max_prob_histogram": (histogram / max(pixels, 1)).tolist(),
            "reliability": reliability,
            # ECE: the gap between confidence and accuracy, weighted by each bin's share of pixels.
            "calibration_error": float(np.sum(np.abs(correct - truth_prob)) / truth.sum()) if truth.sum() else None,
        }
    return groups


def print_summary(stats, class_names):
    u, l = stats["unlabeled"], stats["labeled"]
    width = max(len(name) for name in class_names)
    print(f"pseudo-mask quality against the true masks (IoU, %):\n  {'':<{width}}  unlabelled  labelled")

    def cell(x):
        return "       n/a" if x is None or x != x else f"{x:10.2f}"
    for name in class_names:
        print(f"  {name:<{width}}  {cell(u['per_class'][name])}  {cell(l['per_class'][name])}")
    print(f"  {'mIoU':<{width}}  {cell(u['miou'])}  {cell(l['miou'])}   "
          f"({u['images_with_truth']}/{u['images']} and {l['images_with_truth']}/{l['images']} images have a true mask)")
    for name, g in [("unlabelled", u), ("labelled", l)]:
        histogram = " ".join(f"{100 * x:.0f}" for x in g["max_prob_histogram"])
        print(f"uncertainty, {name}: mean max-probability {g['mean_max_prob']:.3f}, mean entropy "
              f"{g['mean_entropy']:.3f} nats, max-probability >= {CONFIDENT}: {100 * g['confident_share']:.1f}% "
              f"of pixels; histogram in tenths (% of pixels): {histogram}")
    if u["calibration_error"] is not None:
        cells = "  ".join(f"{b['bin'][0]:.1f}-{b['bin'][1]:.1f}: {100 * b['accuracy']:.0f}%" for b in u["reliability"]
                          if b["accuracy"] is not None)
        print(f"reliability, unlabelled (accuracy of the pixels by max-probability): {cells}; "
              f"calibration error {100 * u['calibration_error']:.1f} points")


def print_rounds(folders, rounds):
    """The unlabelled images' pseudo-masks round by round: the paper's claim is that each round is
    better and less uncertain; the calibration error says whether the confidence is earned."""
    print(f"\n{'pseudo-masks of the unlabelled images':<40}{'mIoU':>8}{'max-prob':>10}{'entropy':>9}{'>=0.9':>8}{'ECE':>7}")
    for folder, u in zip(folders, rounds):
        ece = f"{100 * u['calibration_error']:7.1f}" if u["calibration_error"] is not None else f"{'-':>7}"
        print(f"{folder:<40}{u['miou']:8.2f}{u['mean_max_prob']:10.3f}{u['mean_entropy']:9.3f}"
              f"{100 * u['confident_share']:7.1f}%{ece}")


def ego_vehicle_region(description, labeled):
    """Cityscapes' ego vehicle (its car's bonnet, raw id 1 in gtFine's labelIds): the pixels that
    are ego vehicle in at least half of the labelled images' masks, at the images' size."""
    if description.kind != "cityscapes":
        return None
    paths = [description.masks[i] for i in labeled if (description.masks[i] or "").endswith("_labelIds.png")]
    if not paths:
        print("no _gtFine_labelIds.png among the labelled images: the ego vehicle is not masked out")
        return None
    votes = sum(torch.from_numpy(np.array(Image.open(p)) == 1).int() for p in paths)
    region = votes * 2 >= len(paths)
    print(f"ego vehicle: {100 * region.float().mean():.1f}% of each image, from {len(paths)} labelled masks; 255 there")
    return region


def write_preview(path, description, ids, rounds, confidence_dir=None):
    """A contact sheet: a row per image (the image, its true mask, the pseudo-masks of each round
    in `rounds` [(title, folder)] and the confidence), every panel fitted into 160 x 160 pixels."""
    def thumbnail(image, size=160):
        scale = size / max(image.shape[-2:])
        h, w = max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))
        top, left = (size - h) // 2, (size - w) // 2
        return v2.functional.pad(v2.functional.resize(image, [h, w], antialias=True), [left, top, size - w - left, size - h - top], fill=40)

    def classes(folder, image_id):
        return torch.from_numpy(np.array(Image.open(os.path.join(folder, f"{image_id}.png"))))
    titles = ["image", "true mask"] + [title for title, _ in rounds] + (["confidence"] if confidence_dir else [])
    panels = []
    for image_id in ids:
        image = common.read_image(description.images[image_id]).as_subclass(torch.Tensor)
        truth = common.SegmentationDataset(description, [image_id], masks_optional=True)[0][1]
        row = [image] + [evaluate.overlay(image, mask, description.palette)
                         for mask in [truth] + [classes(folder, image_id) for _, folder in rounds]]
        panels += [thumbnail(panel) for panel in row + ([classes(confidence_dir, image_id).expand(3, -1, -1)] if confidence_dir else [])]
    if not panels:
        return
    grid = torchvision.utils.make_grid(panels, nrow=len(titles), padding=2, pad_value=255)
    sheet = Image.new("RGB", (grid.shape[-1], grid.shape[-2] + 16), "white")
    sheet.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, 16))
    for i, title in enumerate(titles):
        ImageDraw.Draw(sheet).text((i * grid.shape[-1] / len(titles) + 4, 2), title, fill="black")
    common.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def read_round(folder, labeled, data_root):
    """The unlabelled images' figures of an earlier round, which must be of the same split and data."""
    record = common.read_record(folder, "--previous", SCRIPT)
    if not os.path.exists(os.path.join(folder, "stats.json")):
        raise common.UserError(f"--previous {folder} is unfinished: run the {SCRIPT} command that made it again")
    if record["recipe"]["data_root"] != data_root or common.read_lines(os.path.join(folder, "labeled.txt")) != sorted(labeled):
        raise common.UserError(f"--previous {folder} was made on other data or another split than --checkpoint's")
    return json.loads(open(os.path.join(folder, "stats.json")).read())["unlabeled"]


def remove_own_files(out):
    """What this script wrote in `out` (for --overwrite); anything else there stays."""
    ids = sum((common.read_lines(os.path.join(out, f"{name}.txt")) for name in ["labeled", "unlabeled"]
               if os.path.exists(os.path.join(out, f"{name}.txt"))), [])
    paths = [os.path.join(out, *parts) for i in ids for parts in [(f"{i}.png",), ("image_stats", f"{i}.npy"),
                                                                  ("confidence", f"{i}.png")]]
    for path in paths + [os.path.join(out, name) for name in ["stats.json", "preview.png", "labeled.txt", "unlabeled.txt"]]:
        if os.path.exists(path):
            os.remove(path)


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise common.UserError("--batch-size must be at least 1 and --workers at least 0")
    device = common.init_distributed_mode(args)
    checkpoint, checkpoint_path = common.load_checkpoint(args.checkpoint)
    description = common.describe_dataset(args.data_root or checkpoint["args"]["data_root"])
    class_names, labeled, unlabeled = checkpoint["class_names"], checkpoint["labeled"], checkpoint["unlabeled"]
    if len(description.class_names) != len(class_names):
        raise common.UserError(f"{checkpoint_path} predicts {len(class_names)} classes but {description.root} has "
                               f"{len(description.class_names)}; is it the right --data-root?")
    training = set(description.train_ids)
    absent = [i for i in labeled + unlabeled if i not in training]
    if absent:
        raise common.UserError(f"{checkpoint_path} was trained with the image {absent[0]}, which is not a training image "
                               f"of {description.root} ({len(absent)} such); is it the right --data-root?")
    recipe = {"checkpoint": "sha256:" + common.file_sha256(checkpoint_path)[:16], "data_root": os.path.realpath(description.root)}
    record = common.open_output(args.out, "--out", SCRIPT, reads=[description.root])
    previous = [read_round(folder, labeled, recipe["data_root"]) for folder in args.previous]
    if record is not None and record["recipe"] != recipe:
        if not args.overwrite:
            raise common.UserError(f"--out {args.out} holds the pseudo-masks of {record['checkpoint']} (step {record['step']}) "
                                   f"on {record['recipe']['data_root']}; use another --out, or add --overwrite to replace them")
        if common.is_main_process():
            remove_own_files(args.out)
    if args.distributed:
        dist.barrier()  # every process has looked at --out before the first one writes there
    if common.is_main_process():
        common.write_record(args.out, "--out", {"script": SCRIPT, "recipe": recipe, "checkpoint": os.path.abspath(checkpoint_path),
                                                "step": checkpoint["step"], "weights": "teacher" if "teacher" in checkpoint else "model"})
        for name, ids in [("labeled", labeled), ("unlabeled", unlabeled)]:
            common.write_text(os.path.join(args.out, f"{name}.txt"), "".join(f"{i}\n" for i in sorted(ids)))
        for folder in {os.path.dirname(os.path.join(args.out, part, i)) for i in labeled + unlabeled
                       for part in ["", "image_stats"] + (["confidence"] if args.save_confidence else [])}:
            os.makedirs(folder, exist_ok=True)  # with your own data, ids may have folders in them
    if args.distributed:
        dist.barrier()

    def done(image_id):
        parts = [(f"{image_id}.png",), ("image_stats", f"{image_id}.npy")] + ([("confidence", f"{image_id}.png")] if args.save_confidence else [])
        return all(os.path.exists(os.path.join(args.out, *p)) for p in parts)
    todo = [i for i in sorted(labeled + unlabeled) if not done(i)]
    print(f"{len(labeled) + len(unlabeled)} training images, {len(labeled) + len(unlabeled) - len(todo)} already done; "
          f"labelling with the {'teacher' if 'teacher' in checkpoint else 'model'} of {checkpoint_path} (step {checkpoint['step']})")

    model = evaluate.model_from_checkpoint(checkpoint, checkpoint_path, device)
    ego = ego_vehicle_region(description, labeled)
    ego = ego.to(device) if ego is not None else None
    image_scale = checkpoint["args"].get("image_scale", 1.0)

    def write(image_id, prediction, row, confidence):
        """An image's files, the PNG last: its presence says that the image is done."""
        def save_row(tmp):
            with open(tmp, "wb") as f:  # a file object, so that numpy adds no .npy to the temporary name
                np.save(f, row)
        common.atomic_write(os.path.join(args.out, "image_stats", f"{image_id}.npy"), save_row)
        if confidence is not None:
            common.atomic_write(os.path.join(args.out, "confidence", f"{image_id}.png"),
                                lambda tmp: Image.fromarray(confidence, mode="L").save(tmp, format="PNG"))
        common.save_mask_png(os.path.join(args.out, f"{image_id}.png"), prediction, description.palette)

    start = time.time()
    dataset = common.SegmentationDataset(description, todo, masks_optional=True)
    loader = common.full_image_loader(dataset, args.batch_size, args.workers, args.rank, args.world_size, image_scale)
    threads = max(1, args.workers)
    with concurrent.futures.ThreadPoolExecutor(threads) as writers:  # PNG encoding and writing overlap the model
        pending = collections.deque()
        for images, masks, indices in loader:
            probs = common.predict(model, common.images_to_device(images, device, device.type == "cuda"), image_scale, args.amp)
            region = ego if ego is not None and ego.shape == masks.shape[-2:] else None
            predictions, max_prob, rows = batch_stats(probs, masks.to(device, non_blocking=True), len(class_names), region)
            predictions, rows = predictions.byte().cpu().numpy(), rows.cpu().numpy()  # the batch read back at once
            confidences = (max_prob * 255).round().byte().cpu().numpy() if args.save_confidence else [None] * len(rows)
            for index, prediction, row, confidence in zip(indices.tolist(), predictions, rows, confidences):
                pending.append(writers.submit(write, todo[index], prediction, row, confidence))
            while len(pending) > 4 * threads:
                pending.popleft().result()  # a bounded backlog; raises what a writer raised
        for future in pending:
            future.result()
    if args.distributed:
        dist.barrier()
    seconds = time.time() - start
    if not common.is_main_process():
        return

    stats = summarize(args.out, labeled, unlabeled, class_names)
    stats.update({"images": len(labeled) + len(unlabeled), "images_labelled_now": len(todo), "seconds": seconds,
                  "images_per_second": len(todo) / seconds if todo else None, "source": os.path.abspath(checkpoint_path)})
    common.write_json(os.path.join(args.out, "stats.json"), stats)
    rounds = [(os.path.basename(os.path.normpath(folder)), folder) for folder in args.previous + [args.out]]
    preview = random.Random(0).sample(sorted(unlabeled), min(8, len(unlabeled)))  # the same images in every round
    write_preview(os.path.join(args.out, "preview.png"), description, preview, rounds,
                  os.path.join(args.out, "confidence") if args.save_confidence else None)
    print_summary(stats, class_names)
    if previous:
        print_rounds(args.previous + [f"{args.out} (this round)"], previous + [stats["unlabeled"]])
    speed = f" ({len(todo) / seconds:.1f} images/s)" if todo else ""
    print(f"wrote {len(todo)} pseudo-masks to {args.out} in {seconds:.1f} s{speed}; stats in {args.out}/stats.json, "
          f"pictures in {args.out}/preview.png")


if __name__ == "__main__":
    common.run_main(main)
