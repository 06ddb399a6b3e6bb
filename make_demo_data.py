"""The offline demo's data: writes its synthetic dataset (no download needed), in the VOC layout or in the
layout of your own data. (Its model, the tiny U-Net of --backbone tiny_unet, is in common.py with the others.)

    python make_demo_data.py --out data/demo/VOC2012
    python make_demo_data.py --layout folder --out data/demo_folder

48x48 images of 1-3 objects of five shape classes (disk, square, triangle, ring, cross) whose
colours (eight, shared by every class) and striped textures are random, so only shape tells the
classes apart, on a textured background with thin clutter lines and pixel noise. A 1-pixel 255
band marks label borders, as in VOC. 2,300 training images, of which the first 300 are the pool
the labelled images are drawn from (VOC's train.txt), and 500 val images. --any-colour draws the
colours from the whole RGB cube instead (the demo's earlier task).

--field-variety makes the images outside the pool (the rest of the training images and all val
images) more varied than those the labelled ones are drawn from, as in an annotation campaign
that labelled a narrow source: each class in three sub-kinds (disk: circle, ellipse, wavy blob;
square: square, rectangle, rhombus; triangle: equilateral, thin, right-angled; ring: round,
elliptic, thick; cross: plus, thin, fat) and a wider range of sizes (docs/demo.md says what it gave).

--layout voc writes JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/{train,
val}.txt, ImageSets/SegmentationAug/train_aug.txt and classes.txt; --layout folder writes images/,
masks/ for the pool's and the val images only (the others are unlabelled), val.txt and
classes.txt. A folder written by other settings or another version is refused.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse

import numpy as np
from PIL import Image

import common
import outputs

CLASSES = ["background", "disk", "square", "triangle", "ring", "cross"]
# Eight colours for every object, background and clutter line, whatever the class: 64 labelled
# images already show each of them, so what they lack is the rest of the variety (docs/demo.md).
PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 40],
                    [230, 60, 220], [40, 220, 230], [245, 245, 245], [120, 70, 20]], dtype=np.float64)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo/VOC2012", help="the folder to write (default: %(default)s)")
    parser.add_argument("--layout", choices=["voc", "folder"], default="voc",
                        help="VOC2012's folders, or your own data's (images/, masks/, classes.txt) "
                             "(default: %(default)s)")
    parser.add_argument("--train", type=int, default=2300, help="training images (default: %(default)s)")
    parser.add_argument("--train-txt", type=int, default=300,
                        help="how many of them are the pool the labelled images are drawn from (default: %(default)s)")
    parser.add_argument("--val", type=int, default=500, help="val images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--field-variety", action="store_true",
                        help="sub-kinds and more sizes outside the pool (see above)")
    parser.add_argument("--any-colour", action="store_true",
                        help="colours drawn at random instead of from the eight of the palette (the demo's "
                             "earlier task; docs/demo.md)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser.parse_args(argv)


def shape_mask(kind, sub, yy, xx, cy, cx, radius, angle, rng):
    """Pixels of one shape of class `kind` and sub-kind `sub` (0: the plain form), centred at
    (cy, cx), rotated by angle."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    stretch = rng.uniform(1.6, 2.1)
    if kind == 1:  # disk: circle, ellipse, wavy blob
        if sub == 1:
            return np.hypot(u / stretch, v * 1.2) <= radius * 0.85
        r = np.hypot(u, v)
        return r <= radius * (1 + 0.18 * np.sin(5 * np.arctan2(v, u))) if sub == 2 else r <= radius
    if kind == 2:  # square: square, rectangle, rhombus
        if sub == 1:
            return np.maximum(abs(u) / stretch, abs(v) * 1.2) <= 0.7 * radius
        if sub == 2:
            return abs(u) / 1.5 + abs(v) <= 0.95 * radius
        return np.maximum(abs(u), abs(v)) <= 0.8 * radius
    if kind == 3:  # triangle: equilateral, thin isosceles, right-angled
        if sub == 2:
            return (u >= -0.6 * radius) & (v >= -0.6 * radius) & (u + v <= 0.7 * radius)
        v = v * (stretch if sub == 1 else 1)
        sides = (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 * radius for a in sides], axis=0)
    if kind == 4:  # ring: round, elliptic, thick
        r = np.hypot(u / (stretch * 0.75) if sub == 1 else u, v)
        return (r <= radius) & (r >= (0.3 if sub == 2 else 0.55) * radius)
    arm = {0: 1 / 3, 1: 1 / 5, 2: 1 / 2}[sub]  # cross: plus, thin, fat
    reach = radius * (1.15 if sub == 1 else 0.85 if sub == 2 else 1)
    return ((abs(u) <= radius * arm) & (abs(v) <= reach)) | ((abs(v) <= radius * arm) & (abs(u) <= reach))


def pick_colour(rng, any_colour):
    return rng.uniform(0, 255, size=3) if any_colour else PALETTE[rng.integers(len(PALETTE))]


def texture(rng, yy, xx, any_colour):
    """A colour modulated by random stripes: colour and texture say nothing about the class."""
    colour = pick_colour(rng, any_colour)
    frequency, angle = rng.uniform(0.1, 0.8), rng.uniform(0, np.pi)
    stripes = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    return np.clip(colour + rng.uniform(10, 60) * stripes, 0, 255)


def make_sample(rng, size, field, any_colour=False):
    """One image and its mask; field: with the sub-kinds and the wider range of sizes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = texture(rng, yy, xx, any_colour) * 0.6 + rng.uniform(0, 100)  # a duller textured background
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.integers(1, len(CLASSES)))
        sub = int(rng.integers(0, 3)) if field else 0
        for attempt in range(20):  # a few tries at a place where the shape stays mostly visible
            radius = rng.uniform(0.12, 0.3) * size if field else rng.uniform(0.18, 0.26) * size
            cy, cx = rng.uniform(radius, size - radius, size=2)
            inside = shape_mask(kind, sub, yy, xx, cy, cx, radius, rng.uniform(0, 2 * np.pi), rng)
            if inside.any() and (mask[inside] > 0).mean() < 0.1:
                break
        image[inside] = texture(rng, yy, xx, any_colour)[inside]
        mask[inside] = kind
    for _ in range(rng.integers(1, 5)):  # thin clutter lines, unlabelled
        y0, x0, y1, x1 = rng.uniform(0, size, size=4)
        t = np.linspace(0, 1, 2 * size)
        ys = np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1)
        xs = np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        image[ys, xs] = pick_colour(rng, any_colour)
    image = np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255).astype(np.uint8)
    # A 1-pixel ignore band where the label changes, as VOC's object borders.
    border = np.zeros_like(mask, dtype=bool)
    border[:-1] |= mask[:-1] != mask[1:]
    border[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    mask[border] = common.IGNORE
    return image, mask


def main(argv=None):
    args = get_args(argv)
    common.check_numbers(args, positive=("train", "train_txt", "val", "size"), at_least_zero=("seed",))
    if not 1 <= args.train_txt <= args.train or not 16 <= args.size <= 1024:
        raise common.UserError("--train-txt must be from 1 to --train, and --size from 16 to 1024 (at most 1024: "
                               "each image is drawn in memory as floats)")
    recipe = {**{k: v for k, v in vars(args).items() if k != "out"}, "code": outputs.file_sha256(__file__)[:16]}
    finished = all(os.path.isfile(os.path.join(args.out, name)) for name in [outputs.RECORD, "classes.txt"])
    record = (outputs.read_record if finished else outputs.open_output)(args.out, "--out", "make_demo_data.py")
    if finished:  # classes.txt comes last; only read, so demos started side by side do not wait for each other
        outputs.check_same_recipe(record["recipe"], recipe, args.out,
                                  "delete it to write it again, or choose another --out")
        print(f"{args.out} exists; not rewritten")
        return
    outputs.write_json(os.path.join(args.out, outputs.RECORD), {"script": "make_demo_data.py", "recipe": recipe})
    voc = args.layout == "voc"
    folders = ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/SegmentationAug"]
    for folder in folders if voc else ["images", "masks"]:
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train = [f"train_{i:05d}" for i in range(args.train)]
    val = [f"val_{i:05d}" for i in range(args.val)]
    for index, image_id in enumerate(train + val):
        image, mask = make_sample(rng, args.size, field=args.field_variety and index >= args.train_txt,
                                  any_colour=args.any_colour)
        Image.fromarray(image).save(os.path.join(args.out, "JPEGImages" if voc else "images", f"{image_id}.jpg"),
                                    quality=95)
        if voc or index < args.train_txt or index >= args.train:  # your own data: masks for the pool and val only
            outputs.save_mask_png(os.path.join(args.out, "SegmentationClass" if voc else "masks", f"{image_id}.png"),
                                  mask,
                                  common.colour_palette())
    lists = [("ImageSets/Segmentation/train.txt", train[:args.train_txt]),
             ("ImageSets/SegmentationAug/train_aug.txt", train),
             ("ImageSets/Segmentation/val.txt", val)] if voc else [("val.txt", val)]
    for name, ids in lists:
        outputs.write_text(os.path.join(args.out, name), "".join(f"{i}\n" for i in ids))
    outputs.write_text(os.path.join(args.out, "classes.txt"), "".join(f"{c}\n" for c in CLASSES))  # last: it is done
    print(f"wrote {args.train} training images ({args.train_txt} in the labelled pool) and {args.val} val images to "
          f"{args.out}, in the {args.layout} layout" + (", with field variety" if args.field_variety else ""))


if __name__ == "__main__":
    outputs.run_main(main)
