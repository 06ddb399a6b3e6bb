"""mIoU and per-class IoU of a checkpoint on the val set: full images, no crop.

    python evaluate.py --checkpoint runs/stage1/checkpoint.pt
    python evaluate.py --checkpoint runs/stage3/checkpoint.pt --flip --scales 0.75 1 1.25 --json val.json

A multi-task checkpoint (stage3_multitask.py) is evaluated with its mean teacher's main head.
Images of the same size are batched together, so --batch-size never changes the result.
"""
import argparse
import os

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt of stage 1 or stage 3")
    parser.add_argument("--data-root", help="the VOC2012 folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes (default: %(default)s)")
    parser.add_argument("--flip", action="store_true", help="also average the prediction of the mirrored image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="average the predictions at these scales of the image (default: 1)")
    parser.add_argument("--save-dir", help="write one palette PNG of predicted classes per val image, <id>.png")
    parser.add_argument("--json", help="write {\"miou\": .., \"per_class\": {..}} (percent) to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.batch_size < 1 or args.workers < 0 or min(args.scales) <= 0:
        raise common.UserError("--batch-size must be at least 1, --workers at least 0 and --scales positive")
    if args.save_dir and os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
        raise common.UserError(f"--save-dir {args.save_dir} is a file, not a folder")
    if args.json and os.path.isdir(args.json):
        raise common.UserError(f"--json {args.json} is a folder, not a file")
    checkpoint = common.load_checkpoint(args.checkpoint)
    data_root = args.data_root or checkpoint["args"]["data_root"]
    common.check_data_root(data_root)
    class_names = checkpoint["class_names"]
    if len(common.read_class_names(data_root)) != len(class_names):
        raise common.UserError(f"{args.checkpoint} predicts {len(class_names)} classes but {data_root} has "
                               f"{len(common.read_class_names(data_root))}; is it the right --data-root?")
    device = common.pick_device(args.device)
    model = common.model_from_checkpoint(checkpoint, args.checkpoint).to(device).eval()
    dataset = common.val_dataset(data_root, len(class_names))
    loader = common.full_image_loader(dataset, args.batch_size, args.workers)
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)

    confusion = common.ConfusionMatrix(len(class_names))
    for images, masks, indices in loader:
        probs = common.predict_probs(model, images.to(device), args.scales, args.flip, args.amp)
        predictions = probs.argmax(1)
        confusion.update(masks.to(device), predictions)
        if args.save_dir:
            for index, prediction in zip(indices.tolist(), predictions.cpu().numpy()):
                common.save_mask_png(os.path.join(args.save_dir, f"{dataset.ids[index]}.png"), prediction)

    which = "teacher" if "teacher" in checkpoint else "model"
    print(f"{args.checkpoint} ({which}, step {checkpoint['step']}) on {len(dataset)} val images of {data_root}:")
    print(confusion.table(class_names))
    if args.json:
        common.write_json(args.json, confusion.report(class_names))


if __name__ == "__main__":
    common.run_main(main)
