"""Writes the offline demo's synthetic dataset in the VOC layout (no download needed).

    python make_demo_data.py --out data/demo/VOC2012

64x64 images of 1-3 objects of five shape classes (disk, square, triangle, ring, cross) with random
colours and textures, so that only shape tells the classes apart, on a textured background with thin
clutter lines and pixel noise. Objects lie inside the image and overlap little: each new shape gets
up to 20 tries at a place where less than a tenth of it lies on earlier ones. A 1-pixel 255 band
marks label borders, as in VOC. Writes JPEGImages/, SegmentationClass/ (palette PNGs),
ImageSets/Segmentation/{train,val}.txt and classes.txt.
"""
import argparse
import os

import numpy as np
from PIL import Image

import common

CLASSES = ["background", "disk", "square", "triangle", "ring", "cross"]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo/VOC2012", help="the folder to write (default: %(default)s)")
    parser.add_argument("--train", type=int, default=2064, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=500, help="val images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser.parse_args(argv)


def shape_mask(kind, yy, xx, cy, cx, radius, angle):
    """Pixels of one shape of the given class, centred at (cy, cx), rotated by angle."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    r = np.hypot(u, v)
    if kind == 1:  # disk
        return r <= radius
    if kind == 2:  # square
        return np.maximum(abs(u), abs(v)) <= 0.8 * radius
    if kind == 3:  # triangle: inside three half-planes 120 degrees apart
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 * radius for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)], axis=0)
    if kind == 4:  # ring
        return (r <= radius) & (r >= 0.55 * radius)
    return ((abs(u) <= radius / 3) & (abs(v) <= radius)) | ((abs(v) <= radius / 3) & (abs(u) <= radius))  # cross


def texture(rng, yy, xx):
    """A random colour modulated by random stripes: colour and texture say nothing about the class."""
    colour = rng.uniform(0, 255, size=3)
    frequency, angle = rng.uniform(0.1, 0.8), rng.uniform(0, np.pi)
    stripes = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    return np.clip(colour + rng.uniform(10, 60) * stripes, 0, 255)


def make_sample(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = texture(rng, yy, xx) * 0.6 + rng.uniform(0, 100)  # a duller textured background
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.integers(1, len(CLASSES)))
        for attempt in range(20):  # a few tries at a place where the shape stays mostly visible
            radius = rng.uniform(0.15, 0.28) * size
            cy, cx = rng.uniform(radius, size - radius, size=2)
            inside = shape_mask(kind, yy, xx, cy, cx, radius, rng.uniform(0, 2 * np.pi))
            if (mask[inside] > 0).mean() < 0.1:
                break
        image[inside] = texture(rng, yy, xx)[inside]
        mask[inside] = kind
    for _ in range(rng.integers(1, 5)):  # thin clutter lines, unlabelled
        y0, x0, y1, x1 = rng.uniform(0, size, size=4)
        t = np.linspace(0, 1, 2 * size)
        ys, xs = np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1), np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        image[ys, xs] = rng.uniform(0, 255, size=3)
    image = np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255).astype(np.uint8)
    # A 1-pixel ignore band where the label changes, as VOC's object borders.
    border = np.zeros_like(mask, dtype=bool)
    border[:-1] |= mask[:-1] != mask[1:]
    border[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    mask[border] = common.IGNORE
    return image, mask


def main(argv=None):
    args = get_args(argv)
    if args.train < 1 or args.val < 1 or args.size < 16:
        raise common.UserError("--train and --val must be at least 1 and --size at least 16")
    if os.path.exists(os.path.join(args.out, "classes.txt")):
        print(f"{args.out} exists; not rewritten")
        return
    rng = np.random.default_rng(args.seed)
    for folder in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"]:
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    splits = {"train": [f"train_{i:05d}" for i in range(args.train)], "val": [f"val_{i:05d}" for i in range(args.val)]}
    for ids in splits.values():
        for image_id in ids:
            image, mask = make_sample(rng, args.size)
            Image.fromarray(image).save(os.path.join(args.out, "JPEGImages", f"{image_id}.jpg"), quality=95)
            common.save_mask_png(os.path.join(args.out, "SegmentationClass", f"{image_id}.png"), mask)
    for name, ids in splits.items():
        common.write_ids(os.path.join(args.out, "ImageSets", "Segmentation", f"{name}.txt"), ids)
    common.write_text(os.path.join(args.out, "classes.txt"), "".join(f"{c}\n" for c in CLASSES))  # last: marks it complete
    print(f"wrote {args.train} training and {args.val} val images to {args.out}")


if __name__ == "__main__":
    common.run_main(main)
