"""Writes a dataset that the scripts cannot read as it comes in their own layout (images/, masks/, classes.txt,
val.txt), linking the images and, where their values are declared in classes.txt, the masks, rather than copying
them (hard links where the file system allows, else symbolic links, else copies).

    python prepare_data.py exports/roboflow --out data/mydata
    python prepare_data.py data/ADEChallengeData2016 --out data/ade20k

What it reads, recognised by the layout:
  - COCO JSON ("images", "annotations", "categories"; COCO as downloaded, with annotations/instances_*.json
    beside train2017/ and val2017/, and CVAT's and Roboflow's COCO exports): each image's polygons and RLE masks
    drawn into masks/<id>.png, the categories as classes 1..K after background; pixels where two objects overlap
    are 255 (ignored), as torchvision's COCO reference does. Images of a JSON whose name or folder says val are
    val, test left out; a file name found in several folders is the one in the JSON's folder or in the folder its
    name gives (instances_val2017.json: val2017/); images under SOURCE in no JSON are unlabelled, but those in a
    test folder. Captions are left out, and person keypoints where another JSON holds the same images; a JSON of
    boxes alone (a detection export) is refused: it holds no masks.
  - Roboflow's semantic segmentation masks (train/, valid/, test/ with x.jpg beside x_mask.png, _classes.csv):
    masks linked, classes.txt from _classes.csv's values, valid/ as val, test/ left out.
  - ADE20K (ADEChallengeData2016 as downloaded: images/ and annotations/ {training, validation},
    objectInfo150.txt, or the development kit's objectInfo150.csv): masks linked, classes.txt mapping the values
    1-150 to the 150 classes (each named by its first name: "building, edifice" is building) and 0 ("other") to
    ignore, validation as val.
  - Oxford-IIIT Pet (images/, annotations/trimaps/, annotations/test.txt): trimaps linked, classes.txt mapping
    2 to background, 1 to pet and 3 (the border) to ignore, the test list as val.
  - your own layout with masks saved as JPEG (images/, masks/<id>.jpg or <id>_mask.jpg): JPEG changes a mask's
    values at object edges; two-class masks are thresholded halfway between their two values into grey PNGs of
    the same two values (it says so); masks of more classes are refused (JPEG mixed their values; export them
    again as PNG).
Everything is read and checked before anything is written: a malformed or ambiguous entry is one line naming the
file and the entry, and what it writes (class lists included) the scripts read as it meant. The same command
again finishes an interrupted run and leaves a finished one alone.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common
import outputs
from common import UserError

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
    if (has("objectInfo150.txt") or has("objectInfo150.csv")) and has("annotations"):
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
    raise UserError(f"{source} is none of the layouts {SCRIPT} converts (COCO JSON, Roboflow's semantic masks, "
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


def class_name(name, where, notes, seen):
    """A class's name as a class list line can hold it: a comma (which marks a table's row there) becomes ';'
    (said in `notes`); an empty name, one a class list would read otherwise ('#...', '=', a tab), or one already
    `seen` ({name: where}) is refused."""
    name = " ".join(str(name).split())
    if not name or name.startswith("#") or "=" in name or name.lower() == "__ignore__":
        raise UserError(f"{where}: the class name {name!r} cannot be written in a class list (empty, or read as a "
                        "comment, a value map or __ignore__ there); rename it")
    if "," in name:
        notes.append(f"{where}: the class name {name!r} is written {name.replace(',', ';')!r} (a class list's line "
                     "holds no comma)")
    if name.replace(",", ";") in seen:
        raise UserError(f"{where}: the class name {name!r} is also {seen[name.replace(',', ';')]}'s; give the two "
                        "classes names of their own")
    seen[name.replace(",", ";")] = where
    return name.replace(",", ";")


def checked_class_list(lines, names):
    """The class list's lines, read back as the scripts read them: the same class names, or refused."""
    read, _, _, _ = common.parse_classes(list(enumerate(lines, 1)), "the classes.txt to be written")
    if read != names:
        raise UserError(f"the class list would be read as {read[:3]}... instead of {names[:3]}...; rename the first "
                        "class")
    return lines


# ============================================================================= the formats
# Each reads and checks everything, and returns (images {id: file}, masks {id: (file, how)}: how is "link" or a
# function writing the PNG, classes.txt's lines or None, val ids, notes).

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
        if classes is None and os.path.isfile(table):
            classes = roboflow_classes(table, notes)
    return images, masks, classes, val, notes


def roboflow_classes(table, notes):
    """_classes.csv: a header ("Pixel Value, Class"), then a value and a name a row, in the header's order."""
    rows = [(n, [cell.strip() for cell in next(csv.reader([line]))]) for n, line in common.read_lines(table, True)]
    has_header = bool(rows) and not any(cell.isdigit() for cell in rows[0][1])
    header = rows[0][1] if has_header else ["Pixel Value", "Class"]
    if len(header) != 2:
        raise UserError(f"{table} line 1: a header of two columns is expected (Pixel Value, Class)")
    value_column = 1 if "value" in header[1].lower() or "pixel" in header[1].lower() else 0
    lines, names, seen = [], [], {}
    for n, cells in rows[has_header:]:
        if len(cells) != 2 or not cells[value_column].isdigit() or int(cells[value_column]) > 255:
            raise UserError(f"{table} line {n}: {','.join(cells)!r} is not a row of a value (0-255) and a name, in "
                            "the header's order; correct the file")
        names.append(class_name(cells[1 - value_column], f"{table} line {n}", notes, seen))
        lines.append(f"{names[-1]} = {int(cells[value_column])}")
    return checked_class_list(lines, names)


def ade20k(source):
    """ADEChallengeData2016: images/ and annotations/ alike, the classes from objectInfo150.txt (tab-separated, as
    the download has it) or objectInfo150.csv (the development kit's)."""
    images = common.files_by_id(os.path.join(source, "images"))  # two files of one id are refused
    masks = {i: (path, "link") for i, path in common.files_by_id(os.path.join(source, "annotations")).items()}
    info = next(os.path.join(source, f"objectInfo150.{kind}") for kind in ["txt", "csv"]
                if os.path.isfile(os.path.join(source, f"objectInfo150.{kind}")))
    rows = []
    for n, line in common.read_lines(info, numbered=True)[1:]:  # after the header, Idx Ratio Train Val Name
        cells = line.split("\t") if info.endswith(".txt") else next(csv.reader([line]))
        if len(cells) != 5 or not cells[0].strip().isdigit():
            raise UserError(f"{info} line {n}: {line!r} is not a row of Idx, Ratio, Train, Val and Name")
        rows.append((n, int(cells[0]), cells[4], re.split(r"[;,]", cells[4])[0]))  # "building, edifice": building
    firsts = [first for *_, first in rows]
    lines, names, notes, seen = ["__ignore__ = 0"], [], ["classes: ADE20K's 150, value 0 ('other') ignored"], {}
    for n, value, name, first in rows:  # a first name shared by two classes: the whole names
        names.append(class_name(first if firsts.count(first) == 1 else name, f"{info} line {n}", notes, seen))
        lines.append(f"{names[-1]} = {value}")
    val = [i for i in masks if i.startswith("validation/")]
    return images, masks, checked_class_list(lines, names), val, notes


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
        raise UserError(f"the JPEG masks of {source} do not hold two classes, and JPEG mixed their values at "
                        "the edges: this cannot be repaired; export the masks again as PNG")
    low, high = int(peaks[0]), int(peaks[-1])
    value = 255 if high > 1 else 1  # the user's two values, 0/255 or 0/1, come back as they were

    def thresholded(path):  # a grey PNG: a viewer shows the values as they were given
        def write(target):
            mask = np.where(np.asarray(Image.open(path).convert("L")) > (low + high) / 2, value, 0).astype(np.uint8)
            outputs.atomic_write(target, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))
        return write
    classes_txt, val_txt = os.path.join(source, "classes.txt"), os.path.join(source, "val.txt")
    classes = common.read_lines(classes_txt) if os.path.isfile(classes_txt) else None
    if classes:
        common.parse_classes(common.read_lines(classes_txt, numbered=True), classes_txt)  # refused as the scripts would
    val = [common.image_id_of(line, images) for line in common.read_lines(val_txt)] if os.path.isfile(val_txt) else []
    return (images, {i: (path, thresholded(path)) for i, path in found.items()}, classes, val,
            [f"masks: JPEG, thresholded at {(low + high) / 2:g} into two values, 0 and {value}, written as PNG"])


# ============================================================================= COCO

def coco_files(source):
    """The COCO annotation files under `source` (two folders deep at most)."""
    found = []
    for path in sorted(Path(source).glob("*.json")) + sorted(Path(source).glob("*/*.json")):
        with open(path, errors="replace") as f:
            head = f.read(4096)  # "info" and "licenses" come first, then "categories" or "images"
        if any(f'"{key}"' in head for key in ["images", "annotations", "categories"]):
            found.append(str(path))
    return found


def read_coco(path):
    """One COCO JSON, checked entry by entry: ({image id: entry}, {image id: [annotations]}, {category id: name},
    what its annotations hold: "masks", "captions" or "keypoints")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e})") from None

    def entries(key):
        value = data.get(key, []) if isinstance(data, dict) else None
        if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
            raise UserError(f"{path}: its \"{key}\" are not a list of entries; is it a COCO file?")
        return value

    def refuse(what, entry, problem):
        raise UserError(f"{path}: {what} {str(entry)[:80]} {problem}; correct the file or export it again")
    categories, images, files = {}, {}, {}
    for c in entries("categories"):
        if "id" not in c or not isinstance(c.get("name"), str) or c["id"] in categories:
            refuse("the category", c, "has no id, no name, or the id of another")
        categories[c["id"]] = c["name"]
    for image in entries("images"):
        missing = [key for key in ["id", "file_name", "height", "width"] if key not in image]
        if missing or not all(isinstance(image[k], int) and image[k] > 0 for k in ["height", "width"]):
            refuse("the image", image, f"has no {missing[0]}" if missing else "has no size in whole pixels")
        if image["id"] in images or image["file_name"] in files:
            twice = "id" if image["id"] in images else "file_name"
            refuse("the image", image, f"has the {twice} of another image (each image needs its own, once)")
        images[image["id"]], files[image["file_name"]] = image, image["id"]
    annotations, kinds = {}, set()
    for a in entries("annotations"):
        kind = "captions" if "caption" in a else "keypoints" if "keypoints" in a else "masks"
        kinds.add(kind)
        if kind == "captions":
            continue
        if a.get("image_id") not in images or a.get("category_id") not in categories:
            refuse("the annotation", a, "names an image_id or a category_id the file does not list")
        if "segmentation" not in a:
            if "bbox" in a:
                raise UserError(f"{path} holds boxes (bbox), not masks: a detection export; export the dataset "
                                "with segmentation (polygons or masks), or move this file out of the source")
            refuse("the annotation", a, "has no segmentation")
        image = images[a["image_id"]]
        problem = segmentation_problem(a["segmentation"], image["height"], image["width"])
        if problem:
            refuse("the annotation", a, problem)
        annotations.setdefault(a["image_id"], []).append(a)
    return images, annotations, categories, ("captions" if "captions" in kinds else
                                             "keypoints" if "keypoints" in kinds else "masks")


def segmentation_problem(segmentation, height, width):
    """What is wrong with a COCO segmentation of an image of this size, or None."""
    if isinstance(segmentation, list):
        ok = all(isinstance(p, list) and len(p) % 2 == 0 and all(isinstance(x, (int, float)) for x in p)
                 for p in segmentation)
        return None if ok else "has a polygon that is not a list of x, y numbers"
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "has a segmentation that is neither polygons nor an RLE mask (counts and size)"
    if list(segmentation["size"]) != [height, width]:
        return f"has an RLE mask of size {segmentation['size']}, but its image is {[height, width]} (height, width)"
    try:
        counts = rle_counts(segmentation["counts"])
    except (IndexError, TypeError, ValueError):
        counts = None
    if counts is None or min(counts, default=0) < 0 or sum(counts) != height * width:
        return f"has RLE counts that do not cover its image's {height}x{width} pixels"
    return None


def coco(source):
    """COCO JSON: each listed image's annotations drawn into its mask; the categories in the order of their ids."""
    everything = common.files_by_id(source)  # {id: image}; two files of one id are refused
    by_name, read, notes = {}, {}, []
    for image_id, path in everything.items():
        by_name.setdefault(os.path.basename(path), []).append(image_id)
    for json_path in coco_files(source):
        images, annotations, categories, kind = read_coco(json_path)
        named = os.path.basename(json_path) + " " + os.path.basename(os.path.dirname(json_path))  # file, folder
        words = set(re.findall(r"[a-z]+", named.lower()))
        split = "test" if words & {"test", "testing"} else "val" if words & {"val", "valid", "validation"} else "train"
        ids = {}
        for coco_id, image in images.items():
            try:
                ids[coco_id] = coco_file(json_path, image["file_name"], by_name, everything)
            except UserError:
                if split != "test":  # a test set's images are left out: they need not be there
                    raise
        read[json_path] = (images, annotations, categories, kind, split, ids)
    masks, val, held_out, categories, listed_in = {}, [], set(), {}, {}
    for json_path, (images, annotations, json_categories, kind, split, ids) in read.items():
        others = {i for path, r in read.items() if path != json_path and r[3] == "masks" for i in r[5].values()}
        if kind == "captions" or kind == "keypoints" and set(ids.values()) <= others:
            why = "images another JSON holds the masks of" if kind == "keypoints" else "no masks"
            notes.append(f"left out: {json_path} ({kind}: {why})")
            continue
        if split == "test":
            held_out |= set(ids.values())
            notes.append(f"left out: the {len(ids)} images of {json_path} (a test set)")
            continue
        for c, name in json_categories.items():
            if categories.setdefault(c, name) != name:
                raise UserError(f"{json_path}: the category {c} is {name!r}, another JSON's is {categories[c]!r}")
        for coco_id, image_id in ids.items():
            if image_id in listed_in:
                raise UserError(f"{everything[image_id]} is listed in {listed_in[image_id]} and in {json_path}; "
                                "leave one of them out of the source")
            listed_in[image_id] = json_path
            image = images[coco_id]
            masks[image_id] = (json_path, draw_coco(annotations.get(coco_id, []), image["height"], image["width"]))
            val += [image_id] if split == "val" else []
    return coco_layout(source, everything, masks, val, held_out, categories, notes)


def coco_file(json_path, file_name, by_name, everything):
    """The id of the image a COCO entry's file_name means: the file whose path ends with it; of several, the one in
    the JSON's own folder, else in a folder its file name gives (instances_train2017.json: train2017/)."""
    candidates = [i for i in by_name.get(os.path.basename(file_name), [])
                  if everything[i].endswith(os.sep + os.path.normpath(file_name))]
    if len(candidates) > 1:
        here = [i for i in candidates if os.path.dirname(everything[i]) == os.path.dirname(json_path)]
        words = set(re.split(r"[^a-z0-9]+", os.path.basename(json_path).lower()))
        candidates = here or [i for i in candidates if set(i.lower().split("/")[:-1]) & words] or candidates
    if len(candidates) != 1:
        raise UserError(f"{json_path}: the image {file_name} is " + ("not under the source" if not candidates else
                        "found in several folders of the source, none of which the JSON's name gives"))
    return candidates[0]


def coco_layout(source, everything, masks, val, held_out, categories, notes):
    """The classes (background, then the categories in the order of their ids) and the images in no JSON:
    unlabelled, but those of a test folder."""
    if len(categories) >= common.IGNORE:
        raise UserError(f"{source}: {len(categories)} categories; a mask holds {common.IGNORE - 1} classes and "
                        "background at most (255 is ignore)")
    order = sorted(categories)
    seen = {"background": "the background"}
    names = ["background"] + [class_name(categories[c], f"{source}: category {c}", notes, seen) for c in order]
    index = {category: i + 1 for i, category in enumerate(order)}
    masks = {i: (path, lambda target, draw=draw: draw(target, index)) for i, (path, draw) in masks.items()}
    images = {i: everything[i] for i in masks}
    unlisted = [i for i in everything if i not in masks and i not in held_out]
    in_test = [i for i in unlisted if {"test", "testing"} & set(re.findall(r"[a-z]+", os.path.dirname(i).lower()))]
    images.update({i: everything[i] for i in unlisted if i not in set(in_test)})
    notes += [f"left out: the {len(in_test)} images of test folders in no JSON"] if in_test else []
    return images, masks, checked_class_list(names, names), val, notes


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


def rle_counts(counts):
    """COCO's RLE counts: a list, or pycocotools' compressed string (5 bits a character, a continuation bit, a sign
    bit; each count after the second relative to the one two before)."""
    if not isinstance(counts, str):
        return [int(c) for c in counts]
    decoded, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more, p, k = c & 0x20, p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        decoded.append(x + decoded[-2] if len(decoded) > 2 else x)
    return decoded


def coco_region(segmentation, height, width):
    """A COCO segmentation (polygons, or RLE: uncompressed counts or COCO's compressed string) as a bool mask."""
    if isinstance(segmentation, list):
        canvas = Image.new("L", (width, height))
        for polygon in segmentation:
            if len(polygon) >= 6:
                ImageDraw.Draw(canvas).polygon(polygon, fill=1)
        return np.asarray(canvas).astype(bool)
    counts = rle_counts(segmentation["counts"])
    flat = np.repeat(np.arange(len(counts)) % 2, counts)  # runs of 0 and 1, column by column
    return flat.astype(bool).reshape(width, height).T


# ============================================================================= writing the layout

def main(argv=None):
    args = get_args(argv)
    if not os.path.isdir(args.source):
        raise UserError(f"{args.source} is not a folder")
    kind = recognise(args.source)
    read = {"coco": coco, "roboflow": roboflow, "ade20k": ade20k, "oxford-pet": oxford_pet, "jpeg-masks": jpeg_masks}
    images, masks, classes, val, notes = read[kind](args.source)  # everything checked before anything is written
    orphan = next(((i, path) for i, (path, _) in masks.items() if i not in images), None)
    if orphan:
        raise UserError(f"{orphan[1]}: a mask without its image ({orphan[0]}) in {args.source}")
    targets = {i: os.path.join(args.out, "images", i + os.path.splitext(path)[1].lower()) for i, path in images.items()}
    mask_targets = {i: os.path.join(args.out, "masks", i + (os.path.splitext(path)[1].lower() if how == "link" else
                                                            ".png")) for i, (path, how) in masks.items()}
    outputs.check_names(list(images))
    recipe = {"source": os.path.realpath(args.source), "format": kind}
    own = [*targets.values(), *mask_targets.values()] + [os.path.join(args.out, name) for name in
                                                         ["classes.txt", "val.txt", outputs.RECORD]]
    record = outputs.open_output(args.out, "--out", SCRIPT, reads=[args.source], own_files=own)
    if record is not None:
        outputs.check_same_recipe(record["recipe"], recipe, args.out, "choose another --out")
        if record.get("finished"):
            print(f"{args.out} holds {args.source} in the scripts' layout already: nothing to do")
            return
    outputs.write_json(os.path.join(args.out, outputs.RECORD), {"script": SCRIPT, "recipe": recipe, "finished": False})
    outputs.interrupt_note = "what is written is whole; the same command finishes it"
    for image_id, path in images.items():
        link(path, targets[image_id])
    for image_id, (path, how) in masks.items():
        if how == "link":
            link(path, mask_targets[image_id])
        elif not os.path.exists(mask_targets[image_id]):
            os.makedirs(os.path.dirname(mask_targets[image_id]), exist_ok=True)
            how(mask_targets[image_id])
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
