"""Writes a dataset that the scripts cannot read as it comes in their own layout (images/, masks/, classes.txt,
val.txt), linking the images and, where their values are declared in classes.txt, the masks, rather than copying
them (hard links where the file system allows, else symbolic links, else copies).

    python prepare_data.py exports/roboflow --out data/mydata
    python prepare_data.py data/ADEChallengeData2016 --out data/ade20k

What it reads, recognised by the layout:
  - COCO JSON ("images", "annotations", "categories"; COCO itself, CVAT's and Roboflow's COCO exports): each
    image's polygons and RLE masks drawn into masks/<id>.png, the categories as classes 1..K after background;
    pixels where two objects overlap are 255 (ignored), as torchvision's COCO reference does. Images of a JSON
    whose name or folder says val are val, test left out; images under SOURCE in no JSON are unlabelled.
  - Roboflow's semantic segmentation masks (train/, valid/, test/ with x.jpg beside x_mask.png, _classes.csv):
    masks linked, classes.txt from _classes.csv's values, valid/ as val, test/ left out.
  - ADE20K (ADEChallengeData2016: images/ and annotations/ {training, validation}, objectInfo150.csv): masks
    linked, classes.txt mapping the values 1-150 to the 150 classes and 0 ("other") to ignore, validation as val.
  - Oxford-IIIT Pet (images/, annotations/trimaps/, annotations/test.txt): trimaps linked, classes.txt mapping
    2 to background, 1 to pet and 3 (the border) to ignore, the test list as val.
  - your own layout with masks saved as JPEG (images/, masks/<id>.jpg or <id>_mask.jpg): JPEG changes a mask's
    values at object edges; two-class masks are thresholded halfway between their two values into grey PNGs of
    the same two values (it says so); masks of more classes are refused (JPEG mixed their values; export them
    again as PNG).
The same command again finishes an interrupted run and leaves a finished one alone.
"""
import argparse
import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common
import outputs

SCRIPT = "prepare_data.py"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the dataset or export, as it came")
    parser.add_argument("--out", required=True, help="the folder to write, new or this script's (e.g. data/mydata)")
    return parser.parse_args(argv)


def recognise(source):
    """The format of `source`, by its layout."""
    def has(*parts):
        return os.path.exists(os.path.join(source, *parts))
    if has("objectInfo150.csv") and has("annotations"):
        return "ade20k"
    if has("annotations", "trimaps"):
        return "oxford-pet"
    if any(has(split, "_classes.csv") for split in ["train", "valid", "test"]):
        return "roboflow"
    if coco_files(source):
        return "coco"
    if has("images") and any(path.lower().endswith((".jpg", ".jpeg")) for path in common.list_images(
            os.path.join(source, "masks"))):
        return "jpeg-masks"
    raise common.UserError(f"{source} is none of the layouts {SCRIPT} converts (COCO JSON, Roboflow's semantic masks, "
                           "ADE20K, Oxford-IIIT Pet, JPEG masks); the README lists what the scripts read as it is")


def link(source, target):
    """`target` as a hard link to `source`, else a symbolic link, else a copy (atomically)."""
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        try:
            os.symlink(os.path.abspath(source), target)
        except OSError:
            outputs.atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


# ============================================================================= the formats
# Each returns (images {id: file}, masks {id: (file, how)}: how is "link" or a function writing the PNG,
# classes.txt's lines or None, val ids, notes).

def roboflow(source):
    """Roboflow's semantic segmentation masks: split folders of x.jpg beside x_mask.png, and _classes.csv."""
    images, masks, val, classes, notes = {}, {}, [], None, []
    for split in sorted(entry.name for entry in os.scandir(source) if entry.is_dir()):
        if split.lower() == "test":
            notes.append(f"left out: {split}/ (a test set)")
            continue
        found = {f"{split}/{i}": path for i, path in common.files_by_id(os.path.join(source, split)).items()}
        for image_id, path in found.items():
            if image_id.endswith("_mask") and image_id[:-5] in found:
                masks[image_id[:-5]] = (path, "link")
            else:
                images[image_id] = path
        val += [i for i in found if split.lower() in ("valid", "val") and i in masks]
        table = os.path.join(source, split, "_classes.csv")
        if classes is None and os.path.isfile(table):  # "Pixel Value, Class", then a value and a name a line
            rows = list(csv.reader(common.read_lines(table)[1:]))
            classes = [f"{name.strip()} = {value.strip()}" for value, name in rows]
    return images, masks, classes, val, notes


def ade20k(source):
    images = common.files_by_id(os.path.join(source, "images"))  # two files of one id are refused
    masks = {i: (path, "link") for i, path in common.files_by_id(os.path.join(source, "annotations")).items()}
    rows = [line.split(",") for line in common.read_lines(os.path.join(source, "objectInfo150.csv"))[1:]]
    classes = ["__ignore__ = 0"] + [f"{row[-1].split(';')[0].strip()} = {row[0]}" for row in rows]
    val = [i for i in masks if i.startswith("validation/")]
    return images, masks, classes, val, ["classes: ADE20K's 150, value 0 ('other') ignored"]


def oxford_pet(source):
    images = common.files_by_id(os.path.join(source, "images"))
    trimaps = common.files_by_id(os.path.join(source, "annotations", "trimaps"))
    masks = {i: (path, "link") for i, path in trimaps.items()}
    test = os.path.join(source, "annotations", "test.txt")
    val = [line.split()[0] for line in common.read_lines(test)] if os.path.isfile(test) else []
    return images, masks, ["background = 2", "pet = 1", "__ignore__ = 3"], [i for i in val if i in masks], \
        ["trimaps: 1 pet, 2 background, 3 the border between them (ignored)"]


def jpeg_masks(source):
    """Your own layout with masks saved as JPEG: two-class masks thresholded into PNG, more classes refused."""
    images = common.files_by_id(os.path.join(source, "images"))
    found = {(i if i in images else i.removesuffix("_mask")): path
             for i, path in common.files_by_id(os.path.join(source, "masks")).items()}
    histogram = sum(np.bincount(np.asarray(Image.open(path).convert("L")).ravel(), minlength=256)
                    for path in found.values())
    peaks = np.flatnonzero(histogram > 0.01 * histogram.sum())  # values on 1% of the pixels at least
    if 1 + np.count_nonzero(np.diff(peaks) > 8) != 2:  # JPEG blurs a value a little, and edges thinly
        raise common.UserError(f"the JPEG masks of {source} do not hold two classes, and JPEG mixed their values at "
                               "the edges: this cannot be repaired; export the masks again as PNG")
    low, high = int(peaks[0]), int(peaks[-1])
    value = 255 if high > 1 else 1  # the user's two values, 0/255 or 0/1, come back as they were

    def thresholded(path):  # a grey PNG: a viewer shows the values as they were given
        def write(target):
            mask = np.where(np.asarray(Image.open(path).convert("L")) > (low + high) / 2, value, 0).astype(np.uint8)
            outputs.atomic_write(target, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))
        return write
    classes_txt, val_txt = os.path.join(source, "classes.txt"), os.path.join(source, "val.txt")
    val = [common.image_id_of(line, images) for line in common.read_lines(val_txt)] if os.path.isfile(val_txt) else []
    return (images, {i: (path, thresholded(path)) for i, path in found.items()},
            common.read_lines(classes_txt) if os.path.isfile(classes_txt) else None, val,
            [f"masks: JPEG, thresholded at {(low + high) / 2:g} into two values, 0 and {value}, written as PNG"])


def coco_files(source):
    """The COCO annotation files under `source` (two folders deep at most)."""
    found = []
    for path in sorted(Path(source).glob("*.json")) + sorted(Path(source).glob("*/*.json")):
        with open(path, errors="replace") as f:
            head = f.read(4096)  # "info" and "licenses" come first, then "categories" or "images"
        if any(f'"{key}"' in head for key in ["images", "annotations", "categories"]):
            found.append(str(path))
    return found


def coco(source):
    """COCO JSON: each listed image's annotations drawn into its mask; the categories in the order of their ids."""
    everything = common.files_by_id(source)  # {id: image}; two files of one id are refused
    by_name, images, masks, val, categories, held_out, notes = {}, {}, {}, [], {}, set(), []
    for image_id, path in everything.items():
        by_name.setdefault(os.path.basename(path), []).append(image_id)
    for json_path in coco_files(source):
        try:
            data = json.loads(Path(json_path).read_text(encoding="utf-8-sig"))
        except ValueError as e:
            raise common.UserError(f"{json_path} is not JSON ({e})") from None
        named = os.path.basename(json_path) + " " + os.path.basename(os.path.dirname(json_path))  # its file, its folder
        words = set(re.findall(r"[a-z]+", named.lower()))
        split = "test" if words & {"test", "testing"} else "val" if words & {"val", "valid", "validation"} else "train"
        annotations = {}
        for a in data.get("annotations", []):
            annotations.setdefault(a["image_id"], []).append(a)
        categories.update({c["id"]: c["name"] for c in data.get("categories", []) if split != "test"})
        for image in data.get("images", []):
            candidates = [i for i in by_name.get(os.path.basename(image["file_name"]), [])
                          if everything[i].endswith(os.sep + os.path.normpath(image["file_name"]))]
            if len(candidates) != 1:
                raise common.UserError(f"{json_path}: the image {image['file_name']} is "
                                       + ("not under " if not candidates else "found twice under ") + source)
            image_id = candidates[0]
            if split == "test":
                held_out.add(image_id)
                continue
            images[image_id] = everything[image_id]
            masks[image_id] = (json_path, draw_coco(annotations.get(image["id"], []), image["height"], image["width"]))
            val += [image_id] if split == "val" else []
        notes += [f"left out: the {len(held_out)} images of {json_path} (a test set)"] if split == "test" else []
    order = sorted(categories)
    index = {category: i + 1 for i, category in enumerate(order)}
    masks = {i: (path, lambda target, draw=draw: draw(target, index)) for i, (path, draw) in masks.items()}
    for image_id, path in everything.items():  # images in no annotation file: unlabelled
        if image_id not in images and image_id not in held_out:
            images[image_id] = path
    return images, masks, ["background"] + [categories[c] for c in order], val, notes


def draw_coco(annotations, height, width):
    """A function writing the mask of one image's COCO annotations (classes by `index`, overlaps 255)."""
    def write(target, index):
        classes, count = np.zeros((height, width), np.uint8), np.zeros((height, width), np.uint8)
        for a in annotations:
            region = coco_region(a["segmentation"], height, width)
            classes[region], count = index[a["category_id"]], count + region
        classes[count > 1] = common.IGNORE
        outputs.save_mask_png(target, classes, common.colour_palette())
    return write


def coco_region(segmentation, height, width):
    """A COCO segmentation (polygons, or RLE: uncompressed counts or COCO's compressed string) as a bool mask."""
    if isinstance(segmentation, list):
        canvas = Image.new("L", (width, height))
        for polygon in segmentation:
            if len(polygon) >= 6:
                ImageDraw.Draw(canvas).polygon(polygon, fill=1)
        return np.asarray(canvas).astype(bool)
    counts = segmentation["counts"]
    if isinstance(counts, str):  # pycocotools' rleFrString: 5 bits a character, a continuation bit, a sign bit
        string, counts, p = counts, [], 0
        while p < len(string):
            x, k, more = 0, 0, True
            while more:
                c = ord(string[p]) - 48
                x |= (c & 0x1F) << 5 * k
                more, p, k = c & 0x20, p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << 5 * k
            counts.append(x + counts[-2] if len(counts) > 2 else x)
    h, w = segmentation["size"]
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)  # runs of 0 and 1, column by column
    return flat.reshape(w, h).T


# ============================================================================= writing the layout

def main(argv=None):
    args = get_args(argv)
    if not os.path.isdir(args.source):
        raise common.UserError(f"{args.source} is not a folder")
    kind = recognise(args.source)
    read = {"coco": coco, "roboflow": roboflow, "ade20k": ade20k, "oxford-pet": oxford_pet, "jpeg-masks": jpeg_masks}
    images, masks, classes, val, notes = read[kind](args.source)  # everything checked before anything is written
    orphan = next(((i, path) for i, (path, _) in masks.items() if i not in images), None)
    if orphan:
        raise common.UserError(f"{orphan[1]}: a mask without its image ({orphan[0]}) in {args.source}")
    recipe = {"source": os.path.realpath(args.source), "format": kind}
    record = outputs.open_output(args.out, "--out", SCRIPT, reads=[args.source])
    if record is not None:
        outputs.check_same_recipe(record["recipe"], recipe, args.out, "choose another --out")
        if record.get("finished"):
            print(f"{args.out} holds {args.source} in the scripts' layout already: nothing to do")
            return
    outputs.write_json(os.path.join(args.out, outputs.RECORD), {"script": SCRIPT, "recipe": recipe, "finished": False})
    outputs.interrupt_note = "what is written is whole; the same command finishes it"
    for image_id, path in images.items():
        link(path, os.path.join(args.out, "images", image_id + os.path.splitext(path)[1].lower()))
    for image_id, (path, how) in masks.items():
        extension = os.path.splitext(path)[1].lower() if how == "link" else ".png"
        target = os.path.join(args.out, "masks", image_id + extension)
        if how == "link":
            link(path, target)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            how(target)
    if classes:
        outputs.write_text(os.path.join(args.out, "classes.txt"), "".join(line + "\n" for line in classes))
    if val:
        outputs.write_text(os.path.join(args.out, "val.txt"), "".join(f"{i}\n" for i in sorted(val)))
    outputs.write_json(os.path.join(args.out, outputs.RECORD), {"script": SCRIPT, "recipe": recipe, "finished": True})
    print(f"{kind}: {len(images)} images, {len(masks)} masks, {len(val) or 'no'} val images listed"
          + (f", {len(classes)} lines in classes.txt" if classes else "") + f"; written to {args.out}", *notes,
          sep="\n")


if __name__ == "__main__":
    outputs.run_main(main)
