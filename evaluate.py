"""Val mIoU and per-class IoU of a checkpoint, or its predictions on your own images.

    python evaluate.py --checkpoint runs/stage3
    python evaluate.py --checkpoint runs/stage3 --compare runs/stage1 runs/control --json runs/summary.json
    python evaluate.py --checkpoint runs/stage3 --flip --scales 0.75 1 1.25 --save-dir predictions/
    python evaluate.py --checkpoint runs/cs100/stage3 --window 512 1024 --stride 341 683
    python evaluate.py --checkpoint runs/stage3 --images my_photos/ --save-dir predictions/

--checkpoint and --compare take a checkpoint.pt of stage 1 or of a multi-task stage, or its run folder; a
multi-task checkpoint is evaluated with its mean teacher's main head, the paper's final model. Images are predicted
whole, at the scale the model was trained at (its --image-scale; --scales multiply it), and compared with the true
masks at their full resolution; intersections and unions are summed over the whole val set. Same-size images are
batched together, so --batch-size never changes the result. --window and --stride predict tile by tile instead, as
the field evaluates full-resolution Cityscapes models. --compare evaluates other checkpoints the same way and says
how far --checkpoint is above each.

With --images (a folder, searched at any depth for .jpg .jpeg .png .bmp .tif .tiff .webp, or one image file; no masks
needed) it writes, for each image, <name>.png (the palette PNG of predicted classes at the image's own size: class
indices, shown in the classes' colours; a dataset of 0/255 masks gets 0 black and 1 white) and <name>_overlay.jpg
(the image with the classes tinted and outlined, and a legend) into --save-dir, keeping the folder structure. The
name is the image's path without its extension, or with it where two images would share a name (a.jpg, a.png).
An image that cannot be read or predicted is named and skipped, and the exit status is then non-zero.
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
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import common
import outputs
from common import UserError


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of a training stage, or its run folder")
    parser.add_argument("--compare", nargs="+", default=[], metavar="CHECKPOINT",
                        help="also evaluate these checkpoints the same way, and say how far --checkpoint is above each")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the checkpoint was trained on, "
                                            "on the val of its run where the data has no val list)")
    parser.add_argument("--images",
                        help="predict this image, or the images in this folder, instead of evaluating on val")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes (default: %(default)s, from this machine's cores)")
    parser.add_argument("--flip", action="store_true", help="also average the prediction of the mirrored image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="average the predictions at these scales of the image, relative to the training scale "
                             "(default: 1)")
    parser.add_argument("--window", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="predict in tiles of this size (sliding window), averaging where they overlap")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="the step between tiles (default: two thirds of --window)")
    parser.add_argument("--save-dir",
                        help="write the predictions here, a palette PNG per image (a new folder, or evaluate.py's)")
    parser.add_argument("--label-ids", action="store_true",
                        help="Cityscapes: write the predictions in its label ids (7 road, 8 sidewalk, 11 building, "
                             "...), the form its benchmark server takes for the test set, instead of train ids")
    parser.add_argument("--json", help="write the mIoU and per-class IoU (percent), and --compare's, to this file")
    return parser.parse_args(argv)


def check_args(args):
    common.check_numbers(args, positive=("batch_size", "scales", "window", "stride"), at_least_zero=("workers",))
    if args.window and min(args.window) < common.MIN_SIDE:
        raise UserError(f"--window must be at least {common.MIN_SIDE} pixels a side")
    if args.stride and not args.window:
        raise UserError("--stride needs --window")
    args.stride = args.stride or (args.window and [max(1, 2 * side // 3) for side in args.window])
    if args.images and (not args.save_dir or args.json or args.compare):
        raise UserError("--images needs --save-dir, the folder its predictions are written to (and no --json "
                        "or --compare)")
    if args.images and not os.path.exists(args.images):
        raise UserError(f"--images {args.images} not found")
    if args.label_ids and not args.save_dir:
        raise UserError("--label-ids is how --save-dir's predictions are written: give --save-dir too")


# ============================================================================= test-time augmentation and tiles

def window_starts(size, window, stride):
    """Tile positions along one side: every `stride`, the last one flush with the end."""
    return sorted(set(range(0, size - window, stride)) | {size - window}) if size > window else [0]


def window_probs(model, images, args, scale):
    """Class probabilities from tiles of --window every --stride, the logits averaged where tiles overlap."""
    size = images.shape[-2:]
    if scale != 1:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    height, width = images.shape[-2:]
    tile_h, tile_w = min(args.window[0], height), min(args.window[1], width)
    total, count = 0, torch.zeros(1, 1, height, width, device=images.device)
    for top in window_starts(height, tile_h, args.stride[0]):
        for left in window_starts(width, tile_w, args.stride[1]):
            with common.autocast(images.device, args.amp):
                tile = model(images[..., top:top + tile_h, left:left + tile_w]).float()
            total = total + F.pad(tile, (left, width - left - tile_w, top, height - top - tile_h))
            count[..., top:top + tile_h, left:left + tile_w] += 1
    return F.interpolate(total / count, size=size, mode="bilinear", align_corners=False).softmax(1)


@torch.no_grad()
def predict(model, images, args, scale):
    """Class probabilities averaged over --scales (of the training scale) and, with --flip, the mirrored images."""
    probs = 0
    for s in args.scales:
        for flip in [False, True] if args.flip else [False]:
            x = images.flip(-1) if flip else images
            p = (window_probs(model, x, args, scale * s) if args.window else
                 common.image_probs(model, x, scale * s, args.amp))
            probs = probs + (p.flip(-1) if flip else p)
    return probs / (len(args.scales) * (2 if args.flip else 1))


# ============================================================================= evaluate.py

def save_prediction(path, prediction, palette, label_ids=None):
    """A prediction as a palette PNG of class indices, or with --label-ids (label_ids: common.cityscapes_label_ids())
    of Cityscapes' label ids."""
    if label_ids is not None:
        _, ids_of, palette = label_ids
        prediction = ids_of[prediction]
    outputs.save_mask_png(path, prediction, palette)


def evaluate_val(model, description, args, device, scale, save=False, label_ids=None):
    """The val set's confusion matrix (every process its share), the predictions saved if asked."""
    dataset = common.SegmentationDataset(description, description.val_ids)
    loader = common.full_image_loader(dataset, args.batch_size, args.workers, args.rank, args.world_size,
                                      scale * min(args.scales))
    confusion = common.ConfusionMatrix(len(description.class_names))
    for images, masks, indices in loader:
        images = common.images_to_device(images, device, device.type == "cuda")
        predictions = predict(model, images, args, scale).argmax(1)
        confusion.update(masks.to(device, non_blocking=True), predictions)
        for index, prediction in zip(indices.tolist(), predictions.cpu().numpy() if save else []):
            path = os.path.join(args.save_dir, f"{dataset.ids[index]}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)  # your own data's ids may have folders in them
            save_prediction(path, prediction, description.palette, label_ids)
    confusion.matrix = common.sum_over_processes(confusion.matrix)
    return confusion


def output_names(files, root):
    """A name per image for <name>.png and <name>_overlay.jpg: its path below `root` without its extension, or with
    it where two images would share a name or a name would also be a folder of another's."""
    full = [os.path.relpath(path, root) for path in files]
    names = [os.path.splitext(name)[0] for name in full]
    while True:
        counts, bad = collections.Counter(names), set(outputs.clashing(names, [".png", "_overlay.jpg"]))
        clash = [i for i, name in enumerate(names) if counts[name] > 1 or name in bad]
        if not clash:
            return names
        if all(names[i] == full[i] for i in clash):
            raise UserError(f"--images: {files[clash[0]]} and another image would write the same file; "
                            "rename one of them")
        for i in clash:
            names[i] = full[i]


def images_to_predict(args):
    """--images' files and the name each one's outputs take."""
    root = args.images if os.path.isdir(args.images) else os.path.dirname(args.images)
    files = common.list_images(args.images) if os.path.isdir(args.images) else [args.images]
    if not files:
        raise UserError(f"--images {args.images} holds no image ({', '.join(common.IMAGE_EXTENSIONS)})")
    return files, output_names(files, root)


def predict_images(model, args, device, scale, checkpoint, files, names, label_ids=None):
    """Predictions for --images, one image at a time (they may all differ in size). An image that cannot be read
    or predicted, or whose output name is too long, is named and skipped; returns (images, skipped)."""
    palette, skipped = checkpoint.get("palette", common.colour_palette()), 0
    for path, name in list(zip(files, names))[args.rank::args.world_size]:
        try:
            if len((os.path.basename(name) + "_overlay.jpg.tmp0000000").encode()) > 255:
                raise UserError(f"{path}: its name is too long for the files named after it (at most 255 bytes with "
                                "_overlay.jpg.tmp<pid>); rename it")
            image = common.read_image(path)
            if min(image.shape[-2:]) * scale * min(args.scales) < common.MIN_SIDE:
                raise UserError(f"{path} is {image.shape[-1]}x{image.shape[-2]}: too small for the model (at "
                                f"least {common.MIN_SIDE} pixels a side at scale {scale * min(args.scales):g})")
            prediction = predict(model, common.images_to_device(image[None], device, device.type == "cuda"), args,
                                 scale).argmax(1)[0].cpu()
        except UserError as e:
            print(f"skipped: {e}", file=sys.stderr, flush=True)
            skipped += 1
            continue
        except torch.cuda.OutOfMemoryError:
            print(f"skipped: {path} is too large for the GPU's memory; predict it with --window", file=sys.stderr,
                  flush=True)
            skipped += 1
            continue
        os.makedirs(os.path.dirname(os.path.join(args.save_dir, name)), exist_ok=True)
        save_prediction(os.path.join(args.save_dir, f"{name}.png"), prediction.numpy(), palette, label_ids)
        picture = outputs.overlay(image.as_subclass(torch.Tensor), prediction, palette)
        picture = Image.fromarray(picture.permute(1, 2, 0).numpy())
        zoom = max(1, 320 // max(picture.size))  # a small image enlarged, its pixels kept sharp
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
        picture = outputs.with_legend(picture, prediction.unique().tolist(), checkpoint["class_names"], palette)
        outputs.atomic_write(os.path.join(args.save_dir, f"{name}_overlay.jpg"),
                             lambda tmp: picture.save(tmp, format="JPEG", quality=90))
    return len(files), int(common.sum_over_processes(torch.tensor(skipped)))


def claim_save_dir(args, checkpoint_path, source, names, reads):
    """--save-dir: a new or empty folder, or one this script wrote with the same checkpoint, images and options
    (its predictions, named `names`, are then written again); apart from the folders it reads."""
    recipe = {"checkpoint": outputs.fingerprint(checkpoint_path), "images": os.path.realpath(source),
              "flip": args.flip, "scales": args.scales, "window": args.window, "stride": args.stride,
              **({"label_ids": True} if args.label_ids else {})}
    own = [os.path.join(args.save_dir, name + suffix) for name in names for suffix in [".png", "_overlay.jpg"]]
    record = outputs.open_output(args.save_dir, "--save-dir", "evaluate.py", reads=reads,
                                 own_files=own + [os.path.join(args.save_dir, outputs.RECORD)])
    if record is not None:
        outputs.check_same_recipe(record["recipe"], recipe, args.save_dir, "use another --save-dir")
    if args.distributed:
        dist.barrier()  # every process has looked at --save-dir before the first one writes there
    if common.is_main_process():
        outputs.write_json(os.path.join(args.save_dir, outputs.RECORD), {
            "script": "evaluate.py", "recipe": recipe, "checkpoint": os.path.abspath(checkpoint_path)})
    if args.distributed:
        dist.barrier()


def check_result_file(path, flag, script, reads=()):
    """A JSON result file: new, or one `script` wrote ("written_by"); never inside a folder the command reads;
    writable, which is checked now rather than after the long pass that makes it. A temporary file that a killed
    write of it left is removed."""
    if os.path.isdir(path) or any(outputs.is_inside(path, folder) for folder in reads):
        raise UserError(f"{flag} {path} is a folder, or inside the data it reads; choose another file")
    try:
        ours = json.loads(Path(path).read_text()).get("written_by") == script if os.path.exists(path) else True
    except (ValueError, AttributeError, OSError):
        ours = False
    if not ours:
        raise UserError(f"{flag} {path} exists and was not written by {script}; choose another file")
    folder = os.path.dirname(path) or "."
    outputs.remove_stale_temporaries([path])
    try:
        os.makedirs(folder, exist_ok=True)
        outputs.write_text(f"{path}.tmp{os.getpid()}", "")
        os.remove(f"{path}.tmp{os.getpid()}")
    except (OSError, UserError):
        raise UserError(f"{flag} {path} cannot be written; choose another file") from None


def print_comparison(path, confusion, compared):
    """--checkpoint's val mIoU above each --compare checkpoint's."""
    width = max(len(p) for p in [path] + [r["path"] for r in compared])
    print(f"\n{'':{width}}{'val mIoU':>10}  {path} is above it by")
    print(f"{path:<{width}}{confusion.miou():10.2f}")
    for r in compared:
        print(f"{r['path']:<{width}}{r['miou']:10.2f}{r['gain']:+10.2f}")


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    check_args(args)
    device = common.init_distributed_mode(args)
    checkpoint, path = outputs.load_checkpoint(args.checkpoint)
    model = common.model_from_checkpoint(checkpoint, path, device)
    scale = checkpoint["args"].get("image_scale", 1.0)
    which = f"{path} ({'teacher' if 'teacher' in checkpoint else 'model'}, step {checkpoint['step']})"
    label_ids = common.cityscapes_label_ids() if args.label_ids else None
    if label_ids and checkpoint["class_names"] != label_ids[0]:
        raise UserError(f"--label-ids: {path} does not predict Cityscapes' 19 classes")
    reads = [outputs.input_folder(path)] + [outputs.input_folder(other) for other in args.compare]

    if args.images:
        files, names = images_to_predict(args)
        claim_save_dir(args, path, args.images, names, reads + [outputs.input_folder(args.images)])
        outputs.interrupt_note = "the predictions written so far are whole; the same command predicts them again"
        total, skipped = predict_images(model, args, device, scale, checkpoint, files, names, label_ids)
        print(f"predicted {total - skipped} of {total} images of {args.images} with {which}; written to "
              f"{args.save_dir}")
        if skipped:
            raise UserError(f"{skipped} of {total} images of {args.images} could not be predicted (named above)")
        return

    root = args.data_root or checkpoint["args"]["data_root"]
    description = common.describe_dataset(root, run_val=outputs.val_of_run(os.path.dirname(path), root))
    others = [outputs.load_checkpoint(other, "--compare") for other in args.compare]
    for other, other_path in [(checkpoint, path)] + others:
        common.check_checkpoint_fits(other, other_path, description)
    models = [common.model_from_checkpoint(other, other_path, device) for other, other_path in others]  # checked now
    if args.json:
        check_result_file(args.json, "--json", "evaluate.py", reads=[description.root])
    if args.save_dir:
        clash = outputs.clashing(description.val_ids, [".png"])
        if clash:
            raise UserError(f"the val image {clash[0]} would be written both as {clash[0]}.png and as a folder "
                            f"of another's prediction; rename the folder {clash[0]}.png")
        claim_save_dir(args, path, description.root, description.val_ids, reads + [description.root])
    outputs.interrupt_note = "nothing of the evaluation is kept but whole predictions; the same command evaluates again"
    confusion = evaluate_val(model, description, args, device, scale, bool(args.save_dir), label_ids)
    print(f"{which} on {len(description.val_ids)} val images of {description.root}:\n"
          f"{common.iou_table(confusion, description.class_names)}")
    result = {"written_by": "evaluate.py", "checkpoint": os.path.abspath(path), "step": checkpoint["step"],
              **confusion.report(description.class_names), "compare": {}}
    compared = []
    for (other, other_path), other_model in zip(others, models):
        miou = evaluate_val(other_model, description, args, device, other["args"].get("image_scale", 1.0)).miou()
        name = os.path.basename(os.path.dirname(os.path.abspath(other_path)))
        result["compare"][name if name not in result["compare"] else other_path] = {
            "checkpoint": os.path.abspath(other_path), "miou": miou, "gain": confusion.miou() - miou}
        compared.append({"path": other_path, "miou": miou, "gain": confusion.miou() - miou})
    if others:
        print_comparison(path, confusion, compared)
    if args.json and common.is_main_process():
        outputs.write_json(args.json, result)


if __name__ == "__main__":
    outputs.run_main(main)
