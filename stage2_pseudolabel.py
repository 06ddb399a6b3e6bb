"""The pseudo-masks between the paper's stages: for every training image of a checkpoint's split (labelled and
unlabelled), the argmax of its main head (the mean teacher's, for a multi-task checkpoint), with their quality
against the true masks, their uncertainty, pictures, and the images to label next. (The paper numbers only its
three training stages; this script is the step before its stages 2 and 3, and after stage 3 to measure the last
round.)

    python stage2_pseudolabel.py --checkpoint runs/stage1 --out runs/pseudo1
    python stage2_pseudolabel.py --checkpoint runs/stage3 --out runs/pseudo3 --previous runs/pseudo1 runs/pseudo2
    torchrun --nproc-per-node 4 stage2_pseudolabel.py --checkpoint runs/stage1 --out runs/pseudo1

--checkpoint is a checkpoint.pt of a training stage, or its run folder. Each pseudo-mask is predicted from the
full image, at the scale the model was trained at, and written as <out>/masks/<id>.png: a palette PNG of class
indices at the image's original size (a dataset of 0/255 masks gets 0 black and 1 white). On Cityscapes the ego
vehicle's region (found in the labelled images' masks) is 255. <out> also holds:
  - labeled.txt, unlabeled.txt, val.txt, labeled_rounds.csv: the checkpoint's split, which stage3_multitask.py
    trains with, the data's val images, and the labelling round of each labelled image;
  - stats.json, the figures printed: quality (mIoU and per-class IoU against the true masks, wherever a true mask
    exists, for the unlabelled and the labelled images apart); uncertainty (mean max-probability, mean per-pixel
    entropy in nats (at most ln C), the share of pixels whose max-probability is at least 0.9, a histogram of
    max-probability, and a reliability table: the accuracy of the pixels by max-probability bin, where a true mask
    exists, with the expected calibration error (ECE)); written last, it marks the folder finished;
  - preview.png: a fixed choice of unlabelled images (the same in every round of a run): the image, its true
    mask, the pseudo-masks of the --previous rounds and of this one and, with --save-confidence, the confidence,
    with a legend of the classes;
  - label_next.csv and label_next.png: the unlabelled images without a mask (all unlabelled images where every
    one has a mask), ranked by the model's uncertainty about them, most uncertain first: by their mean margin
    p1 - p2 between the two most probable classes of each pixel, smallest first (docs/demo.md measures it
    against a random choice). It ranks what the model is unsure of, not what it gets wrong: where true masks
    exist, stats.json gives the Spearman correlation of the ranking (and of one by mean entropy, also in the
    table) with the pixel error;
  - image_stats/<id>.npy, each image's figures; with --save-confidence, confidence/<id>.png (max-probability, 255
    = 1.0).
The same command again finishes an interrupted run and leaves a finished one alone; a folder of another
checkpoint's pseudo-masks is refused, unless --overwrite, which removes only what this script wrote there.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse
import collections
import concurrent.futures
import csv
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torchvision.transforms import v2

import common
import outputs
from common import UserError

BINS = 10  # of max-probability over [0, 1]
RANKED_BY = "mean margin p1 - p2 between the two most probable classes of each pixel, smallest first"
CONFIDENT = 0.9
SCRIPT = "stage2_pseudolabel.py"
OWN_FILES = ["stats.json", "preview.png", "label_next.csv", "label_next.png", "labeled.txt", "unlabeled.txt",
             "val.txt", outputs.ROUNDS]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of a training stage, or its run folder")
    parser.add_argument("--out", required=True,
                        help="folder for the pseudo-masks, new or this script's, e.g. runs/pseudo1")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the checkpoint was trained on, "
                                            "with the val of its run where the data has no val list)")
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


def stat_fields(num_classes):
    """The figures of one image's pseudo-mask, by name and length, in the order of its row in image_stats/."""
    return {"confusion": num_classes * num_classes,  # against the true mask, where there is one
            "pixels": 1, "sum_max_prob": 1, "sum_entropy": 1, "sum_margin": 1, "confident": 1, "has_truth": 1,
            "histogram": BINS,  # pixels by max-probability bin; then, of the pixels with a true label, by bin:
            "judged": BINS, "correct": BINS, "judged_max_prob": BINS}  # how many, how many right, their max-prob


def by_field(rows, num_classes):
    """Rows of per-image figures (images, row length) as {field: (images, field length)}."""
    fields, start = {}, 0
    for name, length in stat_fields(num_classes).items():
        fields[name], start = rows[:, start:start + length], start + length
    return fields


def batch_stats(probs, targets, num_classes, ignore_region=None):
    """The pseudo-masks of a batch (N, H, W; ignore_region set to 255), their max-probability and each image's
    figures (stat_fields) as a row. All on the device, so that a batch is read back at once."""
    n = len(probs)
    top2, top2_classes = probs.topk(2, dim=1)
    max_prob, prediction = top2[:, 0], top2_classes[:, 0]
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

    def per_image_sum(values):
        return values.double().flatten(1).sum(1, keepdim=True)
    fields = {"confusion": per_image(targets.long() * num_classes + prediction.long(), num_classes ** 2, judged),
              "pixels": per_image_sum(torch.ones_like(max_prob)), "sum_max_prob": per_image_sum(max_prob),
              "sum_entropy": per_image_sum(entropy), "sum_margin": per_image_sum(top2[:, 0] - top2[:, 1]),
              "confident": per_image_sum(max_prob >= CONFIDENT),
              "has_truth": judged.flatten(1).any(1, keepdim=True).double(), "histogram": per_image(bins, BINS),
              "judged": per_image(bins, BINS, judged),
              "correct": per_image(bins, BINS, judged & (prediction == targets)),
              "judged_max_prob": per_image(bins, BINS, judged, max_prob)}
    assert list(fields) == list(stat_fields(num_classes))  # the order of a row
    return prediction, max_prob, torch.cat(list(fields.values()), 1)


def load_rows(out, ids, num_classes):
    length = sum(stat_fields(num_classes).values())
    rows = [np.load(os.path.join(out, "image_stats", f"{i}.npy")) for i in ids]
    return by_field(np.stack(rows) if rows else np.zeros((0, length)), num_classes)


def summarize(out, labeled, unlabeled, class_names):
    """stats.json's groups from the per-image figures of every pseudo-mask in the folder."""
    n = len(class_names)
    groups = {}
    for group, ids in [("unlabeled", unlabeled), ("labeled", labeled)]:
        f = {name: value.sum(0) for name, value in load_rows(out, ids, n).items()}
        confusion = common.ConfusionMatrix(n)
        confusion.matrix = torch.from_numpy(f["confusion"].reshape(n, n).round().astype(np.int64))
        pixels, judged = max(f["pixels"][0], 1), f["judged"]
        reliability = [{"bin": [b / BINS, (b + 1) / BINS], "share_of_pixels": t / max(judged.sum(), 1),
                        "mean_max_prob": p / t if t else None, "accuracy": c / t if t else None}
                       for b, (t, c, p) in enumerate(zip(judged, f["correct"], f["judged_max_prob"]))]
        groups[group] = {
            "images": len(ids), "images_with_truth": int(f["has_truth"][0]), **confusion.report(class_names),
            "mean_max_prob": f["sum_max_prob"][0] / pixels, "mean_entropy": f["sum_entropy"][0] / pixels,
            "confident_share": f["confident"][0] / pixels, "max_prob_histogram": (f["histogram"] / pixels).tolist(),
            "reliability": reliability,
            # ECE: the gap between confidence and accuracy, weighted by each bin's share of pixels.
            "calibration_error": (float(np.sum(np.abs(f["correct"] - f["judged_max_prob"])) / judged.sum())
                                  if judged.sum() else None),
        }
    return groups


def rank_to_label(out, description, unlabeled, class_names):
    """The unlabelled images without a mask (all of them where each has one), ranked by their mean margin p1 - p2
    between the two most probable classes of each pixel, smallest first: first the images whose pixels the model
    is most torn between two classes about (on the demo, neither this nor the mean entropy beats a random choice
    clearly; the margin did better on average: docs/demo.md); and, over those with a true mask, the Spearman
    correlations of the ranking by margin and of a ranking by entropy with the share of wrong pixels (the rankings
    measure uncertainty; these say how far each follows the error)."""
    candidates = [i for i in unlabeled if not description.masks.get(i)] or list(unlabeled)
    f = load_rows(out, candidates, len(class_names))
    pixels, judged = f["pixels"][:, 0], f["judged"].sum(1)
    margin, entropy = f["sum_margin"][:, 0] / pixels, f["sum_entropy"][:, 0] / pixels
    error = 1 - f["correct"].sum(1) / np.maximum(judged, 1)
    order = np.argsort(margin, kind="stable")
    rows = [{"rank": rank + 1, "id": candidates[i], "mean_margin": round(float(margin[i]), 4),
             "mean_entropy": round(float(entropy[i]), 4),
             "mean_max_prob": round(float(f["sum_max_prob"][i, 0] / pixels[i]), 4),
             "below_0.9": round(float(1 - f["confident"][i, 0] / pixels[i]), 4),
             "has_mask": bool(description.masks.get(candidates[i])),
             "pixel_error": round(float(error[i]), 4) if judged[i] else None} for rank, i in enumerate(order)]
    truth = judged > 0

    def spearman(score):
        if truth.sum() < 3 or np.ptp(score[truth]) == 0 or np.ptp(error[truth]) == 0:
            return None
        ranks = [np.argsort(np.argsort(x[truth])) for x in (score, error)]
        return float(np.corrcoef(*ranks)[0, 1])
    return rows, {"margin": spearman(-margin), "entropy": spearman(entropy)}


def print_summary(stats, class_names):
    u, l = stats["unlabeled"], stats["labeled"]
    width = max(len(name) for name in class_names)
    print(f"pseudo-mask quality against the true masks (IoU, %):\n  {'':<{width}}  unlabelled  labelled")

    def cell(x):
        return "       n/a" if x is None or x != x else f"{x:10.2f}"
    for name in class_names:
        print(f"  {name:<{width}}  {cell(u['per_class'][name])}  {cell(l['per_class'][name])}")
    print(f"  {'mIoU':<{width}}  {cell(u['miou'])}  {cell(l['miou'])}   "
          f"({u['images_with_truth']}/{u['images']} and {l['images_with_truth']}/{l['images']} images have a true "
          "mask)")
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
    n, rho = stats["label_next"]["images"], stats["label_next"]["spearman_vs_error"]["margin"]
    correlation = "" if rho is None else f"; on those with a true mask, its rank correlation with the error: {rho:.2f}"
    print(f"to label next: {n} images in label_next.csv, the smallest mean margin between two classes (the most "
          f"uncertain) first; the first eight in label_next.png{correlation}")


def print_rounds(folders, rounds):
    """The unlabelled images' pseudo-masks round by round: the paper's claim is that each round is better and
    less uncertain; the calibration error says whether the confidence is earned."""
    print(f"\n{'pseudo-masks of the unlabelled images':<40}{'mIoU':>8}{'max-prob':>10}{'entropy':>9}{'>=0.9':>8}"
          f"{'ECE':>7}")
    for folder, u in zip(folders, rounds):
        ece = f"{100 * u['calibration_error']:7.1f}" if u["calibration_error"] is not None else f"{'-':>7}"
        print(f"{folder:<40}{u['miou']:8.2f}{u['mean_max_prob']:10.3f}{u['mean_entropy']:9.3f}"
              f"{100 * u['confident_share']:7.1f}%{ece}")


def ego_vehicle_region(description, labeled):
    """Cityscapes' ego vehicle (its car's bonnet, raw id 1 in gtFine's labelIds): the pixels that are ego vehicle
    in at least half of the labelled images' masks, at the images' size."""
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


def write_sheet(path, titles, rows, captions, description, size=160):
    """A contact sheet: a column per title, a row of panels (uint8 CHW tensors, each fitted into size x size,
    pixels kept sharp when enlarged) under a caption per row, and a legend of the classes in the masks shown."""
    sheet = Image.new("RGB", (len(titles) * (size + 4) + 4, 18 + len(rows) * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((4 + c * (size + 4), 3), title, fill="black")
    classes = set()
    for r, (row, caption) in enumerate(zip(rows, captions)):
        y = 18 + r * (size + 18)
        draw.text((4, y + 2), caption, fill="black")
        for c, (panel, mask) in enumerate(row):
            classes |= set(mask.unique().tolist()) if mask is not None else set()
            scale = size / max(panel.shape[-2:])
            shape = [max(1, round(side * scale)) for side in panel.shape[-2:]]
            mode = v2.InterpolationMode.NEAREST if scale > 1 else v2.InterpolationMode.BILINEAR
            thumb = v2.functional.resize(panel, shape, interpolation=mode, antialias=True)
            sheet.paste(Image.fromarray(thumb.permute(1, 2, 0).numpy()), (4 + c * (size + 4), y + 16))
    sheet = outputs.with_legend(sheet, sorted(classes), description.class_names, description.palette)
    outputs.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def image_and_masks(description, image_id, folders):
    """An image and its masks as sheet panels: the image, its true mask (the image washed out where it has none),
    then its pseudo-mask in each folder."""
    image = common.read_image(description.images[image_id]).as_subclass(torch.Tensor)
    truth = common.SegmentationDataset(description, [image_id], masks_optional=True)[0][1]
    pseudo = [torch.from_numpy(np.array(Image.open(outputs.pseudo_mask_path(folder, image_id)))) for folder in folders]
    no_truth = (image // 4 + 190, None) if not description.masks.get(image_id) else None
    return [(image, None), no_truth or (outputs.overlay(image, truth, description.palette), truth)] + [
        (outputs.overlay(image, mask, description.palette), mask) for mask in pseudo]


def read_round(folder, labeled, data_root):
    """The unlabelled images' figures of an earlier round, which must be of the same split and data."""
    record = outputs.read_record(folder, "--previous", SCRIPT)
    if not os.path.exists(os.path.join(folder, "stats.json")):
        raise UserError(f"--previous {folder} is unfinished: run the {SCRIPT} command that made it again")
    same_split = common.read_lines(os.path.join(folder, "labeled.txt")) == sorted(labeled)
    if record["recipe"]["data_root"] != data_root or not same_split:
        raise UserError(f"--previous {folder} was made on other data or another split than --checkpoint's")
    if not os.path.isdir(os.path.join(folder, "masks")):
        raise UserError(f"--previous {folder} was written by an earlier version (no masks/ folder); make it "
                        "again with this one")
    return json.loads(open(os.path.join(folder, "stats.json")).read())["unlabeled"]


def image_files(out, image_id, confidence=True):
    """The files this script writes for one image, the pseudo-mask last: its presence says the image is done."""
    return ([os.path.join(out, "image_stats", f"{image_id}.npy")]
            + [os.path.join(out, "confidence", f"{image_id}.png")] * confidence
            + [outputs.pseudo_mask_path(out, image_id)])


def check_data(checkpoint, path, description):
    """The checkpoint's classes and split must be the dataset's; every image's files must have a place."""
    ids = checkpoint["labeled"] + checkpoint["unlabeled"]
    training_ids = set(description.train_ids)
    absent = [i for i in ids if i not in training_ids]
    if absent and os.path.realpath(description.root) == os.path.realpath(checkpoint["args"]["data_root"]):
        raise UserError(f"{path} was trained with the image {absent[0]}, which is no longer a training image of "
                        f"{description.root} ({len(absent)} such: removed, or now val?); put it back, or train again "
                        "from stage 1")
    if absent:
        raise UserError(f"{path} was trained with the image {absent[0]}, which is not a training image of "
                        f"{description.root} ({len(absent)} such); is it the right --data-root?")
    common.check_checkpoint_fits(checkpoint, path, description)
    outputs.check_names(ids)
    clash = outputs.clashing(ids, [".png", ".npy"])
    if clash:
        raise UserError(f"the image {clash[0]} would be written both as a file and as a folder of another "
                        f"image's; rename the folder {clash[0]}.png (or .npy) of the dataset")


def claim_out(args, recipe, description, ids):
    """--out: new, or this script's; another checkpoint's pseudo-masks there only with --overwrite, which removes
    what this script wrote. Returns its record (None: new)."""
    own = [path for i in ids for path in image_files(args.out, i)] + [
        os.path.join(args.out, name) for name in OWN_FILES + [outputs.RECORD]]
    sources = [description.root, outputs.input_folder(args.checkpoint)] + args.previous
    record = outputs.open_output(args.out, "--out", SCRIPT, reads=sources, own_files=own)
    if record is not None and record["recipe"] != recipe:
        if not args.overwrite:
            raise UserError(f"--out {args.out} holds the pseudo-masks of {record['checkpoint']} (step "
                            f"{record['step']}) on {record['recipe']['data_root']}; use another --out, or add "
                            "--overwrite to replace them")
        if common.is_main_process():
            remove_own_files(args.out)
    return record


def remove_own_files(out):
    """What this script wrote in `out` (for --overwrite); anything else there stays."""
    ids = sum((common.read_lines(os.path.join(out, f"{name}.txt")) for name in ["labeled", "unlabeled"]
               if os.path.exists(os.path.join(out, f"{name}.txt"))), [])
    for path in [p for i in ids for p in image_files(out, i)] + [os.path.join(out, name) for name in OWN_FILES]:
        if os.path.exists(path):
            os.remove(path)


def start_out(args, recipe, checkpoint, checkpoint_path, description):
    """The record, the split files and the folders of --out, before the first pseudo-mask; a stats.json of an
    earlier run is removed, as it marks a finished folder."""
    labeled, unlabeled = checkpoint["labeled"], checkpoint["unlabeled"]
    if args.distributed:
        dist.barrier()  # every process has looked at --out before the first one writes there
    if common.is_main_process():
        outputs.write_json(os.path.join(args.out, outputs.RECORD), {
            "script": SCRIPT, "recipe": recipe, "checkpoint": os.path.abspath(checkpoint_path),
            "step": checkpoint["step"], "weights": "teacher" if "teacher" in checkpoint else "model",
            "figures": list(stat_fields(len(checkpoint["class_names"])))})
        outputs.write_ids(args.out, {"labeled": labeled, "unlabeled": unlabeled, "val": description.val_ids})
        outputs.write_rounds(args.out, labeled, checkpoint.get("labeled_rounds", {}))
        for folder in {os.path.dirname(path) for i in labeled + unlabeled
                       for path in image_files(args.out, i, args.save_confidence)}:
            os.makedirs(folder, exist_ok=True)  # with your own data, ids may have folders in them
        stale = os.path.join(args.out, "stats.json")
        if os.path.exists(stale):
            os.remove(stale)
    if args.distributed:
        dist.barrier()


def write_pseudo_masks(args, model, description, todo, ego, image_scale, device):
    """Predict the images of `todo` (every process its share) and write their files, PNG encoding and writing in
    threads that overlap the model. Returns the seconds it took."""
    def write(image_id, prediction, row, confidence):
        stats_file, *confidence_file, mask_file = image_files(args.out, image_id, confidence is not None)
        buffer = io.BytesIO()
        np.save(buffer, row)
        outputs.atomic_write(stats_file, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
        for path in confidence_file:
            outputs.atomic_write(path, lambda tmp: Image.fromarray(confidence, mode="L").save(tmp, format="PNG"))
        outputs.save_mask_png(mask_file, prediction, description.palette)  # last: the image is done

    start, threads = time.time(), max(1, args.workers)
    dataset = common.SegmentationDataset(description, todo, masks_optional=True)
    loader = common.full_image_loader(dataset, args.batch_size, args.workers, args.rank, args.world_size, image_scale)
    with concurrent.futures.ThreadPoolExecutor(threads) as writers:
        pending = collections.deque()
        for images, masks, indices in loader:
            probs = common.image_probs(model, common.images_to_device(images, device, device.type == "cuda"),
                                       image_scale, args.amp)
            region = ego if ego is not None and ego.shape == masks.shape[-2:] else None
            predictions, max_prob, rows = batch_stats(probs, masks.to(device, non_blocking=True),
                                                      len(description.class_names), region)
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
    return time.time() - start


def write_reports(args, model, description, checkpoint, stats, image_scale, device):
    """The pictures and the ranking of the images to label next, then stats.json, which marks the folder finished."""
    unlabeled = checkpoint["unlabeled"]
    ranked, spearman = rank_to_label(args.out, description, unlabeled, description.class_names)
    stats["label_next"] = {"images": len(ranked), "ranked_by": RANKED_BY, "spearman_vs_error": spearman}

    def confidence(image_id):
        """An image's max-probability as a grey panel (white: 1)."""
        image = common.images_to_device(common.read_image(description.images[image_id])[None], device)
        max_prob = common.image_probs(model, image, image_scale, args.amp).max(1)[0][0]
        return [((max_prob * 255).round().byte().cpu().expand(3, -1, -1), None)]
    folders, with_confidence = args.previous + [args.out], ["confidence (white: 1)"] if args.save_confidence else []
    preview = random.Random(0).sample(sorted(unlabeled), min(8, len(unlabeled)))  # the same images in every round
    write_sheet(os.path.join(args.out, "preview.png"),
                ["image", "true mask"] + [os.path.basename(os.path.normpath(f)) for f in folders] + with_confidence,
                [image_and_masks(description, i, folders) + (confidence(i) if with_confidence else [])
                 for i in preview],
                preview, description)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=list(ranked[0]) if ranked else ["rank", "id"])
            table.writeheader()
            table.writerows(ranked)
    outputs.atomic_write(os.path.join(args.out, "label_next.csv"), write_csv)
    top = ranked[:8]
    write_sheet(os.path.join(args.out, "label_next.png"),
                ["image", "true mask", "pseudo-mask", "confidence (white: 1)"],
                [image_and_masks(description, r["id"], [args.out]) + confidence(r["id"]) for r in top],
                [f"{r['rank']}. {r['id']}: mean margin {r['mean_margin']:.3f}"
                 + ("" if r["has_mask"] else " (no true mask)") for r in top],
                description)
    outputs.write_json(os.path.join(args.out, "stats.json"), stats)  # last: the folder is finished


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    common.check_numbers(args, positive=("batch_size",), at_least_zero=("workers",))
    device = common.init_distributed_mode(args)
    checkpoint, checkpoint_path = outputs.load_checkpoint(args.checkpoint)
    root = args.data_root or checkpoint["args"]["data_root"]
    description = common.describe_dataset(root, run_val=outputs.val_of_run(os.path.dirname(checkpoint_path), root))
    class_names, labeled, unlabeled = checkpoint["class_names"], checkpoint["labeled"], checkpoint["unlabeled"]
    check_data(checkpoint, checkpoint_path, description)
    recipe = {"checkpoint": outputs.fingerprint(checkpoint_path), "data_root": os.path.realpath(description.root)}
    record = claim_out(args, recipe, description, labeled + unlabeled)
    previous = [read_round(folder, labeled, recipe["data_root"]) for folder in args.previous]
    todo = [i for i in sorted(labeled + unlabeled)
            if not all(map(os.path.exists, image_files(args.out, i, args.save_confidence)))]
    if record is not None and record["recipe"] == recipe and not todo and os.path.exists(
            os.path.join(args.out, "stats.json")):  # finished: left exactly as it is
        stats = json.loads(open(os.path.join(args.out, "stats.json")).read())
        print(f"{args.out} holds these pseudo-masks, finished (stats.json): nothing to do")
        print_summary(stats, class_names)
        if previous:
            print_rounds(args.previous + [f"{args.out} (this round)"], previous + [stats["unlabeled"]])
        return
    if record is not None and record.get("figures") != list(stat_fields(len(class_names))):
        todo = sorted(labeled + unlabeled)  # an earlier version's figures of each image: all made again
    start_out(args, recipe, checkpoint, checkpoint_path, description)
    which = "teacher" if "teacher" in checkpoint else "model"
    print(f"{len(labeled) + len(unlabeled)} training images, {len(labeled) + len(unlabeled) - len(todo)} already done; "
          f"labelling with the {which} of {checkpoint_path} (the paper's stage {checkpoint.get('stage')}, step "
          f"{checkpoint['step']})")
    outputs.interrupt_note = "the pseudo-masks written so far are whole and kept; the same command writes the rest"

    model = common.model_from_checkpoint(checkpoint, checkpoint_path, device)
    ego = ego_vehicle_region(description, labeled)
    ego = ego.to(device) if ego is not None else None
    image_scale = checkpoint["args"].get("image_scale", 1.0)
    seconds = write_pseudo_masks(args, model, description, todo, ego, image_scale, device)
    if not common.is_main_process():
        return
    stats = summarize(args.out, labeled, unlabeled, class_names)
    stats.update({"images": len(labeled) + len(unlabeled), "images_labelled_now": len(todo), "seconds": seconds,
                  "images_per_second": len(todo) / seconds if todo else None,
                  "source": os.path.abspath(checkpoint_path)})
    write_reports(args, model, description, checkpoint, stats, image_scale, device)
    print_summary(stats, class_names)
    if previous:
        print_rounds(args.previous + [f"{args.out} (this round)"], previous + [stats["unlabeled"]])
    speed = f" ({len(todo) / seconds:.1f} images/s)" if todo else ""
    print(f"wrote {len(todo)} pseudo-masks to {args.out}/masks in {seconds:.1f} s{speed}; stats in "
          f"{args.out}/stats.json, pictures in {args.out}/preview.png")


if __name__ == "__main__":
    outputs.run_main(main)
