"""mIoU and per-class IoU of a checkpoint on the val set, or its predictions on your own images.

    python evaluate.py --checkpoint runs/stage1/checkpoint.pt
    python evaluate.py --checkpoint runs/stage3/checkpoint.pt --flip --scales 0.75 1 1.25 --json val.json
    python evaluate.py --checkpoint runs/cs/stage3/checkpoint.pt --window 512 1024 --stride 341 683
    python evaluate.py --checkpoint runs/stage3/checkpoint.pt --images my_photos/ --save-dir predictions/

A multi-task checkpoint (stage3_multitask.py) is evaluated with its mean teacher's main head.
Images are predicted whole, at the scale the model was trained at (its --image-scale; --scales
multiply it), and compared with the true masks at their full resolution. Same-size images are
batched together, so --batch-size never changes the result. --window and --stride predict tile
by tile instead, as the field evaluates full-resolution Cityscapes models.

With --images DIR (any .jpg/.jpeg/.png under it, nested or not; no masks needed) it writes, for
each image, <name>.png (the palette PNG of predicted classes at the image's own size) and
<name>_overlay.jpg into --save-dir, keeping the folder structure.
"""
import argparse
import os
import sys

import torch
from PIL import Image

import common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of stage 1 or stage 3")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--images", help="predict these images (a folder, searched recursively) instead of evaluating on val")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes (default: %(default)s, from this machine's cores)")
    parser.add_argument("--flip", action="store_true", help="also average the prediction of the mirrored image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="average the predictions at these scales of the image, relative to the training scale (default: 1)")
    parser.add_argument("--window", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="predict in tiles of this size (sliding window), averaging where they overlap")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="the step between tiles (default: two thirds of --window)")
    parser.add_argument("--save-dir", help="write one palette PNG of predicted classes per image, <id>.png")
    parser.add_argument("--json", help="write {\"miou\": .., \"per_class\": {..}} (percent) to this file")
    return parser.parse_args(argv)


def check_args(args):
    common.check_finite_floats(args)
    if args.batch_size < 1 or args.workers < 0 or min(args.scales) <= 0:
        raise common.UserError("--batch-size must be at least 1, --workers at least 0 and --scales positive")
    if args.window and min(args.window) < 1 or args.stride and min(args.stride) < 1:
        raise common.UserError("--window and --stride must be at least 1 pixel")
    if args.stride and not args.window:
        raise common.UserError("--stride needs --window")
    if args.window and not args.stride:
        args.stride = [max(1, 2 * side // 3) for side in args.window]
    if args.images and not args.save_dir:
        raise common.UserError("--images needs --save-dir, the folder its predictions are written to")
    if args.json and os.path.isdir(args.json):
        raise common.UserError(f"--json {args.json} is a folder, not a file")
    if args.save_dir:
        common.make_dir(args.save_dir, "--save-dir")


def predict(model, images, args, image_scale):
    return common.predict_probs(model, images, [s * image_scale for s in args.scales], args.flip, args.amp,
                                window=args.window, stride=args.stride)


def evaluate_val(model, description, args, device, image_scale, class_names):
    """The val set's confusion matrix (every process its share), with the predictions saved if asked."""
    dataset = common.val_dataset(description)
    confusion = common.ConfusionMatrix(len(class_names))
    for images, masks, indices in common.full_image_loader(dataset, args.batch_size, args.workers):
        predictions = predict(model, common.to_device(images, device), args, image_scale).argmax(1)
        confusion.update(masks.to(device), predictions)
        if args.save_dir:
            for index, prediction in zip(indices.tolist(), predictions.cpu().numpy()):
                common.save_mask_png(os.path.join(args.save_dir, f"{dataset.ids[index]}.png"), prediction, description.palette)
    confusion.matrix = common.sum_over_processes(confusion.matrix)
    return confusion, len(dataset)


def predict_folder(model, args, device, image_scale, palette):
    """Predictions for every image under --images, one at a time (they may all differ in size).
    An unreadable image is named and skipped; the count of those is returned."""
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(args.images)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise common.UserError(f"--images {args.images} holds no .jpg, .jpeg or .png image")
    rank, world = common.rank_and_world()
    failed = 0
    for path in files[rank::world]:
        try:
            image = common.read_image(path)
        except common.UserError as e:
            sys.stderr.write(f"skipped: {e}\n")
            failed += 1
            continue
        prediction = predict(model, common.to_device(common.normalize(image)[None], device), args, image_scale).argmax(1)[0].cpu()
        name = os.path.splitext(os.path.relpath(path, args.images))[0]
        os.makedirs(os.path.dirname(os.path.join(args.save_dir, name)), exist_ok=True)
        common.save_mask_png(os.path.join(args.save_dir, f"{name}.png"), prediction.numpy(), palette)
        picture = common.overlay(image.as_subclass(torch.Tensor), prediction, palette).permute(1, 2, 0).numpy()
        common.atomic_write(os.path.join(args.save_dir, f"{name}_overlay.jpg"),
                            lambda tmp: Image.fromarray(picture).save(tmp, format="JPEG", quality=90))
    failed = int(common.sum_over_processes(torch.tensor(failed)))
    return len(files), failed


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    check_args(args)
    checkpoint = common.load_checkpoint(args.checkpoint)
    args.channels_last, args.compile = False, False
    device = common.finish_running_args(args)
    class_names = checkpoint["class_names"]
    image_scale = checkpoint["args"].get("image_scale", 1.0)
    model = common.model_from_checkpoint(checkpoint, args.checkpoint).to(device).eval()
    which = "teacher" if "teacher" in checkpoint else "model"

    if args.images:
        palette = common.palette_of(checkpoint.get("dataset", "voc"))
        total, failed = predict_folder(model, args, device, image_scale, palette)
        print(f"predicted {total - failed} of {total} images under {args.images} with the {which} of {args.checkpoint}; "
              f"written to {args.save_dir}")
        if failed:
            raise common.UserError(f"{failed} of {total} images under {args.images} could not be read (named above)")
        return

    description = common.describe_dataset(args.data_root or checkpoint["args"]["data_root"])
    if len(description.class_names) != len(class_names):
        raise common.UserError(f"{args.checkpoint} predicts {len(class_names)} classes but {description.root} has "
                               f"{len(description.class_names)}; is it the right --data-root?")
    confusion, count = evaluate_val(model, description, args, device, image_scale, class_names)
    print(f"{args.checkpoint} ({which}, step {checkpoint['step']}) on {count} val images of {description.root}:")
    print(confusion.table(class_names))
    if args.json and common.is_main_process():
        common.write_json(args.json, confusion.report(class_names))


if __name__ == "__main__":
    common.run_main(main)
