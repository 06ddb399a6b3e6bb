"""Pseudo-masks for every training image (labelled and unlabelled) from a checkpoint, with their
quality against the ground truth, their uncertainty and a picture of some of them.

    python stage2_pseudolabel.py --checkpoint runs/stage1/checkpoint.pt --out runs/pseudo1
    torchrun --nproc-per-node 4 stage2_pseudolabel.py --checkpoint runs/stage1/checkpoint.pt --out runs/pseudo1

Each pseudo-mask is the argmax of the main head (the mean teacher's, for a multi-task checkpoint),
full image, single scale (the scale the model was trained at), written as <out>/<id>.png: a
palette PNG of class indices at the image's original size. On Cityscapes the ego vehicle's
region (found in the labelled images' masks) is 255. <out>/stats.json holds the figures the
script prints:
  - quality: mIoU and per-class IoU of the pseudo-masks against the true masks, wherever a true
    mask exists, for the unlabelled and the labelled images separately;
  - uncertainty: mean max-probability, mean per-pixel entropy (nats; at most ln C), the share of
    pixels whose max-probability is at least 0.9, a histogram of max-probability, and a
    reliability table: the accuracy of the pseudo-mask pixels by max-probability bin, where a
    true mask exists, with the expected calibration error (ECE).
<out>/preview.png shows a fixed choice of unlabelled images (the same in every round of a run):
the image, its true mask where one exists, the pseudo-mask and, with --save-confidence, the
confidence. A rerun into the same folder from the same checkpoint skips the finished images; a
folder that holds another checkpoint's pseudo-masks is refused unless --overwrite.
"""
import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

import common

BINS = 10  # of max-probability over [0, 1]
CONFIDENT = 0.9


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of stage 1 or stage 3")
    parser.add_argument("--out", required=True, help="folder for the pseudo-masks, e.g. runs/pseudo1")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass; only same-size images share one (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes (default: %(default)s, from this machine's cores)")
    parser.add_argument("--save-confidence", action="store_true",
                        help="also write confidence/<id>.png, the max-probability map (uint8, 255 = 1.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear pseudo-masks of another checkpoint from --out instead of refusing")
    return parser.parse_args(argv)


def prepare_out(out, source, overwrite):
    """Make --out ready for this checkpoint's pseudo-masks; never mix two checkpoints' outputs."""
    common.make_dir(out, "--out")
    source_path = os.path.join(out, "source.json")
    try:
        with open(source_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: treated as an unknown source
        previous = None
    if os.listdir(out) and (previous or {}).get("sha256") != source["sha256"]:
        if not overwrite:
            written_by = previous["checkpoint"] if previous else "an unknown source"
            raise common.UserError(f"--out {out} already holds pseudo-masks from {written_by}; "
                                   "add --overwrite to replace them, or choose another --out")
        for name in os.listdir(out):  # only what this script writes
            path = os.path.join(out, name)
            if name in ("image_stats", "confidence"):
                shutil.rmtree(path)
            elif name.endswith((".png", ".json")) or ".tmp" in name:
                os.remove(path)
    common.write_json(source_path, source)
    os.makedirs(os.path.join(out, "image_stats"), exist_ok=True)


def save_npy(path, array):
    with open(path, "wb") as f:  # a file object, so that numpy adds no .npy to the temporary name
        np.save(f, array)


def image_stats(probs, target, num_classes, ignore_region=None):
    """The pseudo-mask of one image (ignore_region set to 255) and its figures as one vector:
    confusion matrix against the truth; pixel count, sum of max-probability, sum of entropy,
    confident pixels, has-truth flag; then by max-probability bin: pixels, pixels with truth,
    correct pixels, and the sum of max-probability over the pixels with truth."""
    max_prob, prediction = probs.max(0)
    if ignore_region is not None:
        prediction[ignore_region] = common.IGNORE
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(0)
    confusion = common.ConfusionMatrix(num_classes)
    confusion.update(target.masked_fill(prediction == common.IGNORE, common.IGNORE), prediction)  # the region is not judged
    has_truth = (target != common.IGNORE) & (prediction != common.IGNORE)
    totals = [max_prob.numel(), max_prob.double().sum().item(), entropy.double().sum().item(),
              (max_prob >= CONFIDENT).sum().item(), float(has_truth.any())]
    bins = (max_prob * BINS).long().clamp(max=BINS - 1)

    def per_bin(where, weights=None):
        return torch.bincount(bins[where], weights=None if weights is None else weights[where].double(), minlength=BINS).tolist()
    every = torch.ones_like(has_truth)
    calibration = per_bin(every) + per_bin(has_truth) + per_bin(has_truth & (prediction == target)) + per_bin(has_truth, max_prob)
    return prediction, max_prob, np.array(confusion.matrix.flatten().tolist() + totals + calibration, dtype=np.float64)


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
            "images": len(ids), "images_with_truth": int(with_truth),
            **confusion.report(class_names),
            "mean_max_prob": sum_max_prob / max(pixels, 1), "mean_entropy": sum_entropy / max(pixels, 1),
            "confident_share": confident / max(pixels, 1),
            "max_prob_histogram": (histogram / max(pixels, 1)).tolist(),
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


def ego_vehicle_region(description, labeled):
    """Cityscapes' ego vehicle (its car's bonnet, raw id 1 in gtFine's labelIds): the pixels that
    are ego vehicle in at least half of the labelled images' masks, at the images' size."""
    paths = [description.raw_masks[i] for i in labeled if i in description.raw_masks]
    if description.name != "cityscapes":
        return None
    if not paths:
        print("no _gtFine_labelIds.png among the labelled images: the ego vehicle is not masked out")
        return None
    votes = sum(torch.from_numpy(np.array(Image.open(p)) == 1).int() for p in paths)
    region = votes * 2 >= len(paths)
    print(f"ego vehicle: {100 * region.float().mean():.1f}% of each image, from {len(paths)} labelled masks; 255 there")
    return region


def write_preview(out, description, unlabeled, confidence):
    """preview.png: the image, its true mask, the pseudo-mask (and the confidence) of a seeded
    choice of unlabelled images, the same in every round of a run, read back from the files."""
    columns = [("image", "image"), ("true mask", "truth"), ("pseudo-mask", out)]
    if confidence:
        columns.append(("confidence", ("confidence", os.path.join(out, "confidence"))))
    common.save_mask_sheet(os.path.join(out, "preview.png"), description, common.preview_ids(unlabeled), columns)


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    common.check_finite_floats(args)
    if args.batch_size < 1 or args.workers < 0:
        raise common.UserError("--batch-size must be at least 1 and --workers at least 0")
    checkpoint = common.load_checkpoint(args.checkpoint)
    description = common.describe_dataset(args.data_root or checkpoint["args"]["data_root"])
    args.channels_last, args.compile = False, False
    device = common.finish_running_args(args)
    class_names = checkpoint["class_names"]
    labeled, unlabeled = checkpoint["labeled"], checkpoint["unlabeled"]
    image_scale = checkpoint["args"].get("image_scale", 1.0)
    source = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": common.file_sha256(args.checkpoint),
              "step": checkpoint["step"], "weights": "teacher" if "teacher" in checkpoint else "model"}
    if common.is_main_process():
        prepare_out(args.out, source, args.overwrite)
        if args.save_confidence:
            os.makedirs(os.path.join(args.out, "confidence"), exist_ok=True)
    common.barrier()

    def finished(image_id):
        return all(os.path.exists(os.path.join(args.out, *parts)) for parts in [
            (f"{image_id}.png",), ("image_stats", f"{image_id}.npy")] + (
            [("confidence", f"{image_id}.png")] if args.save_confidence else []))
    todo = [i for i in sorted(labeled + unlabeled) if not finished(i)]
    print(f"{len(labeled) + len(unlabeled)} training images, {len(labeled) + len(unlabeled) - len(todo)} already done; "
          f"labelling with the {source['weights']} of {args.checkpoint} (step {checkpoint['step']})")

    model = common.model_from_checkpoint(checkpoint, args.checkpoint).to(device).eval()
    ego = ego_vehicle_region(description, labeled)
    dataset = common.true_mask_dataset(description, todo, masks_optional=True)
    start = time.time()
    if todo:  # each process labels its share of the images
        for images, masks, indices in common.full_image_loader(dataset, args.batch_size, args.workers):
            probs = common.predict_probs(model, common.to_device(images, device), scales=[image_scale], amp=args.amp)
            for p, target, index in zip(probs, masks.to(device), indices.tolist()):
                image_id = todo[index]
                region = ego.to(device) if ego is not None and ego.shape == target.shape else None
                prediction, max_prob, stats = image_stats(p, target, len(class_names), region)
                # The PNG goes last: its presence says every file of the image is complete.
                common.atomic_write(os.path.join(args.out, "image_stats", f"{image_id}.npy"),
                                    lambda tmp: save_npy(tmp, stats))
                if args.save_confidence:
                    confidence = (max_prob * 255).round().byte().cpu().numpy()
                    common.atomic_write(os.path.join(args.out, "confidence", f"{image_id}.png"),
                                        lambda tmp: Image.fromarray(confidence, mode="L").save(tmp, format="PNG"))
                common.save_mask_png(os.path.join(args.out, f"{image_id}.png"), prediction.cpu().numpy(), description.palette)
    common.barrier()
    seconds = time.time() - start
    if not common.is_main_process():
        return

    stats = summarize(args.out, labeled, unlabeled, class_names)
    stats.update({"images": len(labeled) + len(unlabeled), "images_labelled_now": len(todo), "seconds": seconds,
                  "images_per_second": len(todo) / seconds if todo else None, "source": source})
    common.write_json(os.path.join(args.out, "stats.json"), stats)
    write_preview(args.out, description, unlabeled, args.save_confidence)
    print_summary(stats, class_names)
    speed = f" ({len(todo) / seconds:.1f} images/s)" if todo else ""
    print(f"wrote {len(todo)} pseudo-masks to {args.out} in {seconds:.1f} s{speed}; stats in {args.out}/stats.json, "
          f"pictures in {args.out}/preview.png")


if __name__ == "__main__":
    common.run_main(main)
