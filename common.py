"""What the scripts share about their data and their model: the datasets (PASCAL VOC with SBD's masks and the
VOC-style exports, Cityscapes, your own folder) and their class lists; the model, DeepLabv3 with the auxiliary heads
(and the CPU demo's tiny U-Net); whole-image prediction; the mIoU metric; devices and processes; and the one-line
error that every user's mistake becomes. What the scripts write is outputs.py's; the training run, training.py's."""
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.transforms import v2

IGNORE = 255  # the label of pixels that count nowhere: object borders, padding, what S moved in from outside
VOC_CLASSES = ("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
               "person pottedplant sheep sofa train tvmonitor").split()
BACKBONES = ["resnet101", "resnet50", "tiny_unet"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")  # lossless: JPEG changes a mask's values at edges
MIN_SIDE = 8  # the shortest image side the models take (the tiny U-Net halves it three times)
OS_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini"}  # what Windows leaves in folders (macOS's are hidden files)


# ============================================================================= user errors and flags

class UserError(Exception):
    """A mistake in the user's input or files, or a full disk: reported as one line, without a traceback."""


def read_lines(path, numbered=False):
    """A text file's non-empty lines, stripped (numbered: with their line numbers); read as UTF-8, without the
    byte-order marks some editors write."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").replace("\ufeff", "").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    numbered_lines = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    return numbered_lines if numbered else [line for _, line in numbered_lines]


def check_numbers(args, positive=(), at_least_zero=()):
    """Before any work: NaN and infinity are refused in every flag, 0 and less in the flags named in `positive`
    (lengths, sizes, rates, scales), less than 0 in those named in `at_least_zero`."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            problem = ("NaN and infinity are not allowed" if not math.isfinite(v) else
                       "it must be above 0" if name in positive and v <= 0 else
                       "it must be 0 or more" if name in at_least_zero and v < 0 else None)
            if problem:
                raise UserError(f"--{name.replace('_', '-')} {v}: {problem}")


def default_workers():
    """Data-loading processes: up to 8, no more than this process's share of the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# ============================================================================= devices and processes

def init_distributed_mode(args):
    """One process per GPU under torchrun (the first prints): sets args.distributed, rank, world_size; the device."""
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.distributed = args.world_size > 1
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device name (try cuda, cuda:1 or cpu)") from None
    if args.distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        dist.barrier()
        import builtins
        builtin_print = builtins.print
        builtins.print = lambda *a, force=False, **k: builtin_print(*a, **k) if force or args.rank == 0 else None
    return device


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def sum_over_processes(tensor):
    """The tensor summed over all processes (itself when alone); NCCL needs it on the GPU."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(on_device)
    return on_device.to(tensor.device)


def autocast(device, enabled):
    """bf16 autocast on CUDA when --amp is given (bf16 needs no gradient scaler); a no-op otherwise."""
    return torch.autocast("cuda", torch.bfloat16) if enabled and device.type == "cuda" else contextlib.nullcontext()


def images_to_device(images, device, channels_last=False):
    """A loader's uint8 images (a quarter of float's bytes to copy) on the device, normalised as ImageNet's."""
    images = images.to(device, non_blocking=True)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True),
                                   [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


# ============================================================================= datasets
# VOC (and LabelMe's and CVAT's VOC-style exports), Cityscapes and your own folder fill in one DataDescription: each
# image and mask, how mask values map to classes, which ids train and which validate. prepare_data.py converts others.

@dataclasses.dataclass
class DataDescription:
    kind: str               # "voc" (also VOC-style exports), "cityscapes" or "folder"
    root: str
    class_names: list
    palette: list           # flattened RGB triples, for the palette PNGs written
    images: dict            # id -> image file, for every training and val image
    masks: dict             # id -> mask file, or None for an image without one
    train_ids: list         # every training image (sorted); never a val image
    val_ids: list
    pool: list              # the masked training images stage 1's --labeled N draws from (VOC classic: train.txt's)
    label_table: object = None  # numpy lookup from a mask's values to classes (255: ignore; -1: no class's)
    colours: dict = None        # {(r, g, b): class} for colour masks, from the class list
    notes: list = dataclasses.field(default_factory=list)  # what the start of a run says about the data


def describe_dataset(root, flag="--data-root", run_val=None):
    """Recognise the dataset by its folders: Cityscapes, VOC2012 or a VOC-style export, or your own data. run_val:
    the val of the run a command continues, (ids, its file), taken where the data has no val list of its own."""
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root} is not a folder (VOC2012, Cityscapes or your own data; see README)")
    layouts = [name for name in ["leftImg8bit", "JPEGImages", "images"] if os.path.isdir(os.path.join(root, name))]
    if len(layouts) > 1:
        raise UserError(f"{flag} {root} holds both {layouts[0]}/ and {layouts[1]}/, the layouts of two kinds of "
                        "dataset; keep one of them there, or move the other dataset into a folder of its own")
    if os.path.isdir(os.path.join(root, "leftImg8bit")):
        return cityscapes(root, flag)
    for folder, describe in [("JPEGImages", voc), ("images", own_data)]:
        if os.path.isdir(os.path.join(root, folder)):
            return describe(root, flag, run_val)
    raise UserError(f"{flag} {root} is neither VOC2012 (JPEGImages/), Cityscapes (leftImg8bit/) nor your own data "
                    "(images/, masks/, classes.txt); prepare_data.py converts COCO, Roboflow, ADE20K, Oxford pets")


def voc(root, flag, run_val=None):
    """VOC2012 with SBD's masks, and the VOC-style exports of LabelMe (labelme2voc) and CVAT (Segmentation mask 1.1).
    Masks: SBD's SegmentationClassAug/ for training images, SegmentationClass/ (VOC's; CVAT's in colour), LabelMe's
    SegmentationClassPNG/. Training ids: train_aug.txt's, SegmentationClassAug/'s, train.txt's or every image's."""
    images, notes, aug = files_by_id(os.path.join(root, "JPEGImages")), [], os.path.join(root, "SegmentationClassAug")

    def listed(name):
        path = os.path.join(root, "ImageSets", name)
        return [line.split()[0] for line in read_lines(path)] if os.path.isfile(path) else None

    def mask_of(image_id, folders):
        paths = (os.path.join(root, folder, f"{image_id}.png") for folder in folders)
        return next((path for path in paths if os.path.isfile(path)), None)
    aug_ids = sorted(name[:-4] for name in os.listdir(aug) if name.endswith(".png")) if os.path.isdir(aug) else None
    train_ids = listed("SegmentationAug/train_aug.txt") or aug_ids or listed("Segmentation/train.txt") or sorted(images)
    val_ids, own = listed("Segmentation/val.txt"), ["SegmentationClass", "SegmentationClassPNG"]
    absent = [i for i in train_ids + (val_ids or []) if i not in images]
    if absent:
        raise UserError(f"{root}: {absent[0]} has a mask or a line in ImageSets/ but no image in JPEGImages/")
    masks = {i: mask_of(i, ["SegmentationClassAug"] + own) for i in train_ids}
    val_ids = val_ids or choose_val(root, images, masks, notes, run_val)
    masks.update({i: mask_of(i, own + ["SegmentationClassAug"]) for i in val_ids})  # VOC's own val masks, not SBD's
    train_ids, classic = sorted(set(train_ids) - set(val_ids)), set(listed("Segmentation/train.txt") or images)
    names, colours, table, class_notes = read_classes(root) or (
        list(VOC_CLASSES), None, None, ["classes: PASCAL VOC's 21 (no classes.txt, class_names.txt or labelmap.txt)"])
    return DataDescription("voc", root, names, colour_palette(colours), images, masks, train_ids, val_ids,
                           [i for i in train_ids if masks[i] and i in classic], table, colours, notes + class_notes)


def cityscapes(root, flag):
    """Cityscapes: leftImg8bit/{train,val}/<city>/ with gtFine's labelIds (by torchvision's table) or labelTrainIds."""
    if not os.path.isdir(os.path.join(root, "gtFine")):
        raise UserError(f"{flag} {root} has leftImg8bit/ but no gtFine/: Cityscapes needs both (see README)")
    images, masks, ids_of = {}, {}, {"train": [], "val": []}
    for split in ids_of:
        if not os.path.isdir(os.path.join(root, "leftImg8bit", split)):
            raise UserError(f"{flag} {root} has no leftImg8bit/{split}/ (see README)")
        for path in list_images(os.path.join(root, "leftImg8bit", split)):
            image_id = os.path.basename(path).removesuffix("_leftImg8bit.png")
            if image_id in images:
                raise UserError(f"Cityscapes image {image_id} appears twice under {root}/leftImg8bit")
            images[image_id] = path
            ids_of[split].append(image_id)
            gt = os.path.join(root, "gtFine", split, os.path.basename(os.path.dirname(path)), image_id + "_gtFine_")
            masks[image_id] = next(filter(os.path.isfile, [gt + "labelIds.png", gt + "labelTrainIds.png"]), None)
    table, classes = np.full(256, -1, dtype=np.int16), torchvision.datasets.Cityscapes.classes
    for c in classes:
        table[max(c.id, 0)] = c.train_id if 0 <= c.train_id < IGNORE else IGNORE
    classes = sorted((c for c in classes if 0 <= c.train_id < IGNORE), key=lambda c: c.train_id)
    palette, train_ids = [value for c in classes for value in c.color], sorted(ids_of["train"])
    extra = os.path.join(root, "leftImg8bit", "train_extra")
    notes = [f"{extra}/ (the coarsely annotated images) is not used: the splits are of the finely annotated "
             "train/ and val/"] if os.path.isdir(extra) else []
    return DataDescription("cityscapes", root, [c.name for c in classes], palette + [0] * (768 - len(palette)), images,
                           masks, train_ids, sorted(ids_of["val"]), [i for i in train_ids if masks[i]],
                           label_table=table if any(p and p.endswith("labelIds.png") for p in masks.values()) else None,
                           notes=notes)


def cityscapes_label_ids():
    """Cityscapes' train ids (the 19 classes) as its label ids (road 7, sidewalk 8, building 11, ...), the form of
    its benchmark's submissions: (the 19 class names, the id of each train id, the palette of label-id PNGs)."""
    classes = sorted((c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE),
                     key=lambda c: c.train_id)
    palette = [0] * 768
    for c in torchvision.datasets.Cityscapes.classes:
        palette[3 * max(c.id, 0):3 * max(c.id, 0) + 3] = c.color if c.id > 0 else (0, 0, 0)
    return [c.name for c in classes], np.array([c.id for c in classes] + [0] * (256 - len(classes)), np.uint8), palette


def own_data(root, flag, run_val=None):
    """Your own data: images/ (any depth; the path below it without extension is the id), masks/<id>.png (or
    <id>_mask.png, any lossless format) where there is one, a class list (without one, masks of only 0 and 255, or
    0 and 1, are background and foreground), and val.txt, else a seeded fifth of the masked images as val."""
    images, masks, notes, mask_root = files_by_id(os.path.join(root, "images")), {}, [], os.path.join(root, "masks")
    others = [path for path in list_images(os.path.join(root, "images"), extensions="")
              if not path.lower().endswith(IMAGE_EXTENSIONS) and os.path.basename(path).lower() not in OS_FILES]
    if others:  # LabelMe's .json beside its images, or photos in a format not read here (.heic)
        kinds = sorted({os.path.splitext(path)[1].lower() or os.path.basename(path) for path in others})
        notes.append(f"images/: {len(others)} files left out, not images of a kind read here ({', '.join(kinds[:5])}"
                     f"{', ...' if len(kinds) > 5 else ''}; images: {' '.join(IMAGE_EXTENSIONS)})")
    for path in list_images(mask_root, extensions=""):
        if os.path.basename(path).lower() in OS_FILES:
            continue
        mask_id = os.path.splitext(os.path.relpath(path, mask_root))[0].replace(os.sep, "/")
        mask_id = mask_id if mask_id in images else mask_id.removesuffix("_mask")  # Kaggle's x_mask.png
        if path.lower().endswith((".jpg", ".jpeg")):
            raise UserError(f"mask {path} is a JPEG, which changes a mask's values at edges; save the masks as PNG, "
                            f"or let prepare_data.py {root} --out NEW_FOLDER convert them (two classes: thresholded)")
        if mask_id not in images or not path.lower().endswith(MASK_EXTENSIONS):
            raise UserError(f"{path}: a mask must be masks/<id>.png (or <id>_mask.png) for an image "
                            "images/<id>.<extension>; rename it")
        if mask_id in masks:
            raise UserError(f"{masks[mask_id]} and {path} are both masks of the image {mask_id}; remove one")
        masks[mask_id] = path
    if len(masks) < 2:
        raise UserError(f"{flag} {root} has {len(masks)} masks in masks/; it needs two at least, to train and to "
                        "validate (COCO JSON and other exports: prepare_data.py writes their masks; see README)")
    notes.append(f"masks: {len(masks)} of the {len(images)} images have one; the others are unlabelled"
                 if len(masks) < len(images) else f"masks: every one of the {len(images)} images has one")
    names, colours, table, class_notes = read_classes(root) or (None, None, None, [])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # every mask's values, checked now rather than in training
        found = set().union(*pool.map(lambda p: set(read_mask(p, colours=colours).unique().tolist()), masks.values()))
    palette, binary = colour_palette(colours), names is None or len(names) == 2 and table is None and not colours
    if names is None and not found <= {0, 1, IGNORE}:
        raise UserError(f"{root} has no class list and its masks hold the values {', '.join(map(str, sorted(found)))}; "
                        "name the classes in classes.txt, a line each, in the order of their values (see README)")
    if binary and IGNORE in found and 1 not in found:  # 0/255 masks: 255 is the foreground, white in what is written
        table, palette = np.array([0] + [-1] * 254 + [1], np.int16), colour_palette({(255, 255, 255): 1})
        class_notes.append("masks: only 0 and 255 with two classes; 255 is the second class, not ignore")
    if names is None:
        names = ["background", "foreground"]
        class_notes.append(f"classes: background (0) and foreground ({255 if table is not None else 1}): no class list")
    valid = table >= 0 if table is not None else (np.arange(256) < len(names)) | (np.arange(256) == IGNORE)
    for path in masks.values() if not all(valid[v] for v in found) else []:  # read_mask names the first at fault
        read_mask(path, len(names), None, table, colours)
    val_ids = choose_val(root, images, masks, notes, run_val)
    train_ids = sorted(set(images) - set(val_ids))
    return DataDescription("folder", root, names, palette, images, {i: masks.get(i) for i in images}, train_ids,
                           val_ids, [i for i in train_ids if i in masks], table, colours, notes + class_notes)


def check_not_val(description, ids, what):
    """Training images must not be val images: refused, and why it happens (the data's val changed)."""
    leaked = sorted(set(ids) & set(description.val_ids))
    if leaked:
        raise UserError(f"{len(leaked)} images of {what} are val images of {description.root} now (first: "
                        f"{leaked[0]}): its val changed since (without a val.txt, val is a seeded fifth of the masked "
                        "images, which changes as masks are added); copy the run's val.txt into the data")


def check_checkpoint_fits(checkpoint, path, description):
    """A checkpoint must predict the data's classes and must not have trained on its val images (where it trained on
    this data: the same ids in other data are other images)."""
    names = checkpoint["class_names"]
    if names != description.class_names:
        raise UserError(f"{path} predicts {len(names)} classes but {description.root} has "
                        f"{len(description.class_names)}, or other ones ({', '.join(names[:3])}, ... against "
                        f"{', '.join(description.class_names[:3])}, ...); is it the right --data-root, with the class "
                        "list it was trained with?")
    if os.path.realpath(checkpoint["args"]["data_root"]) == os.path.realpath(description.root):
        check_not_val(description, checkpoint["labeled"] + checkpoint["unlabeled"], f"{path}'s training")


def files_by_id(folder):
    """{id: file} of the images under `folder`, the id being the path below it without extension."""
    files = {}
    for path in list_images(folder):
        image_id = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        if image_id in files:
            raise UserError(f"{files[image_id]} and {path} have the same id {image_id}; rename one of them")
        files[image_id] = path
    return files


def choose_val(root, images, masks, notes, run_val=None):
    """The val ids of a dataset without a val list of its own: val.txt's; else those of the run a command continues
    (run_val: its stages and later labelling rounds keep one val as masks are added); else a seeded fifth of the
    masked images."""
    if os.path.exists(os.path.join(root, "val.txt")):
        source = f"{root}/val.txt"
        val_ids = sorted({image_id_of(line, images) for line in read_lines(source)})
        notes.append(f"val: the {len(val_ids)} images of val.txt")
    elif run_val:
        val_ids, source = sorted(run_val[0]), run_val[1]
        notes.append(f"val: the {len(val_ids)} images of {source}, the run's val (no val.txt in {root})")
    else:
        masked = sorted(i for i in images if masks.get(i))
        if len(masked) < 2:
            raise UserError(f"{root} has {len(masked)} images with a mask; it needs two at least, to train and to "
                            "validate")
        notes.append(f"val: {max(1, len(masked) // 5)} of the {len(masked)} masked images, a seeded fifth (no val.txt; "
                     "this run's later stages and labelling rounds keep it)")
        return sorted(random.Random(0).sample(masked, max(1, len(masked) // 5)))
    for image_id in val_ids:
        if not masks.get(image_id):
            what = "has no mask (a val image needs one)" if image_id in images else "is no image of the dataset"
            raise UserError(f"{source} lists {image_id}, which {what}")
    return val_ids



def read_classes(root):
    """The class list, checked, or None: (names, {colour: class} or None, value table or None, notes). classes.txt
    or LabelMe's class_names.txt: a class a line, background first, with its colour in colour masks (R G B or #rrggbb)
    and its values in the masks after '=' ("pet = 1") where needed; "__ignore__ = V ..." names values that count
    nowhere (a bare "__ignore__", LabelMe's: 255). CVAT's labelmap.txt: "name:R,G,B::" lines."""
    path = next((os.path.join(root, name) for name in ["classes.txt", "class_names.txt", "labelmap.txt"]
                 if os.path.isfile(os.path.join(root, name))), None)
    return parse_classes(read_lines(path, numbered=True), path) if path else None


def parse_classes(numbered_lines, path):
    """read_classes' reading of a class list's (line number, line) pairs; prepare_data.py checks what it writes
    with it."""
    entries, notes = [], [f"classes: from {path}"]  # (line number, name, colour, values or None)

    def refuse(n, what):
        raise UserError(f"{path} line {n}: {what}; see the README for a class list's lines")
    lines = [(n, line) for n, line in numbered_lines if not line.startswith("#")]  # CVAT's comment lines
    if lines and lines[0][1].lower() in {"name", "names", "class", "classes", "class_name", "label", "labels"}:
        notes.append("{} line {}: {!r} read as a header, not a class".format(path, *lines.pop(0)))
    for n, line in lines:
        if path.endswith("labelmap.txt"):  # CVAT's name:R,G,B:parts:actions
            line = line.split(":")[0] + " " + " ".join(line.split(":")[1].split(",")) if ":" in line else line
        elif "," in line.split("=")[0] or "\t" in line:
            refuse(n, f"{line!r} is a table's row; write the class's name, then '= VALUE' for its value in the masks")
        left, equals, right = line.partition("=")
        words, colour, values = left.split(), None, right.replace(",", " ").split()
        if len(words) >= 4 and all(w.isdigit() and int(w) < 256 for w in words[-3:]):
            colour, words = tuple(int(w) for w in words[-3:]), words[:-3]
        elif len(words) >= 2 and re.fullmatch(r"#[0-9a-fA-F]{6}", words[-1]):
            colour, words = tuple(int(words[-1][i:i + 2], 16) for i in (1, 3, 5)), words[:-1]
        if equals and (not values or not all(v.isdigit() and int(v) < 256 for v in values)):
            refuse(n, f"{line!r}: after '=' come the class's values in the masks, numbers from 0 to 255")
        entries.append((n, " ".join(words), colour, [int(v) for v in values] if equals else None))
    ignored = [v for _, name, _, values in entries if name == "__ignore__" for v in values or []]
    if any(name == "__ignore__" for _, name, _, _ in entries):
        notes.append(f"{path}: __ignore__ is no class; the values it counts nowhere: {sorted(set(ignored) | {IGNORE})}")
    entries, first_line = [e for e in entries if e[1] != "__ignore__"], {}
    for n, name, _, _ in entries:
        if not name or name in first_line:
            refuse(n, f"{name!r} is listed twice (first on line {first_line[name]})" if name else "a name is missing")
        first_line[name] = n
    if not 2 <= len(entries) <= IGNORE:
        refuse(lines[-1][0] if lines else 1, f"{len(entries)} class{'es' * (len(entries) != 1)}; background and one "
               f"more at least are needed, {IGNORE} at most (a mask's values are 0-{IGNORE - 1}; {IGNORE} is ignore)")
    colours, given = [e[2] for e in entries], [e[3] is not None for e in entries]
    if any(colours) and (not all(colours) or len(set(colours)) < len(colours)):
        raise UserError(f"{path}: give every class a colour of its own (R G B or #rrggbb), or none of them")
    if any(given) and not all(given):
        refuse(entries[given.index(False)][0], "give every class its values in the masks after '=', or none")
    table = None
    if any(given) or ignored:  # else each class is its own index in the masks
        table = np.full(256, -1, np.int16)
        for value, c in [(v, c) for c, e in enumerate(entries) for v in e[3] or [c]] + [(v, IGNORE) for v in ignored]:
            if table[value] != -1:
                raise UserError(f"{path}: the mask value {value} is given twice (to two classes, or to one and "
                                "__ignore__)")
            table[value] = c
        table[IGNORE] = IGNORE if table[IGNORE] == -1 else table[IGNORE]
        notes.append(f"{path}: mask values mapped to classes, e.g. " + ", ".join(
            f"{e[1]} = {' '.join(map(str, e[3] or [c]))}" for c, e in enumerate(entries[:4])))
    return [e[1] for e in entries], {c: i for i, c in enumerate(colours)} if any(colours) else None, table, notes


def colour_palette(colours=None):
    """The palette of the PNGs written: PASCAL VOC's colour map, with the classes' colours from the class list."""
    palette = [[sum((i >> (3 * bit + channel) & 1) << (7 - bit) for bit in range(8)) for channel in range(3)]
               for i in range(256)]  # class i's bits dealt to R, G, B in turn, from the top bit down
    for near_ignore, spare in [(63, 252), (127, 253), (191, 254)]:  # greys close to the ignore colours, 255's
        palette[near_ignore], palette[spare] = palette[spare], palette[near_ignore]  # (224, 224, 192) and white
    for colour, index in (colours or {}).items():
        palette[index] = list(colour)
    return [value for rgb in palette for value in rgb]


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """The files under a folder (any depth) with one of `extensions` in any case, sorted. Hidden files and folders
    (.ipynb_checkpoints/, macOS's ._ files) are left out; linked folders are read, each once (a link back up is
    no loop)."""
    files, seen = [], set()
    for path, folders, names in os.walk(folder, followlinks=True):
        # sorted: of two links to one folder, the first by name is read, every time
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        real = os.path.realpath(path)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        files += [os.path.join(path, name) for name in names if name.lower().endswith(extensions)
                  and not name.startswith(".")]
    return sorted(files)


def image_id_of(line, images):
    """The id a line of your own data's split files names: an id, or an image's path below images/."""
    word = line if line in images else line.split()[0].removeprefix("images/")
    return os.path.splitext(word)[0] if word not in images and word.lower().endswith(IMAGE_EXTENSIONS) else word


def read_image(path):
    """An RGB uint8 image as a viewer shows it: EXIF orientation, 16-bit and float grey scaled, alpha on white."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode == "F" or image.mode.startswith("I"):  # float (TIFF), 16-bit grey
                array = np.nan_to_num(np.asarray(image, dtype=np.float64))
                scale = 1 / 257 if image.mode != "F" else 255 if array.max(initial=0) <= 1 else 1
                image = Image.fromarray((array * scale).clip(0, 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; replace it, or move it out of the data") from None
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def read_mask(path, num_classes=None, size=None, label_table=None, colours=None):
    """A mask file's classes (255: ignore): index and palette PNGs as they are, RGB through `colours` (the class
    list) or as grey; label_table maps the values first (Cityscapes' labelIds, value maps, 0/255 masks).
    Without num_classes: the file's values, unchecked."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            palette = image.getpalette() if image.mode == "P" else None
            array = np.array(image.convert({"RGBA": "RGB", "LA": "L", "1": "L"}.get(image.mode, image.mode)))
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read mask {path}: {e}") from None
    if palette and colours:  # a palette PNG is read by index: its colours must say the same as the class list's
        colour_of = {c: colour for colour, c in colours.items()}
        for value in set(np.unique(array).tolist()) - {IGNORE}:
            drawn = tuple(palette[3 * value:3 * value + 3])
            if colour_of.get(value) != drawn:
                given = " ".join(map(str, colour_of.get(value, ())))
                raise UserError(f"mask {path} is a palette PNG whose value {value} is drawn {' '.join(map(str, drawn))}"
                                ", but the class list gives " + (f"class {value} the colour {given}" if given else
                                                                 f"no class the value {value}")
                                + "; correct the class list's colours or the masks")
    if array.ndim == 3 and (array == array[..., :1]).all():
        array = array[..., 0]
    elif array.ndim == 3 and colours:
        codes = array[..., 0].astype(np.int64) << 16 | array[..., 1].astype(np.int64) << 8 | array[..., 2]
        unique, inverse = np.unique(codes, return_inverse=True)
        found = [colours.get((c >> 16, c >> 8 & 255, c & 255)) for c in unique.tolist()]
        if None in found:
            c = int(unique[found.index(None)])
            raise UserError(f"mask {path} has the colour {c >> 16} {c >> 8 & 255} {c & 255}, no class's in classes.txt")
        array = np.array(found, dtype=np.uint8)[inverse].reshape(codes.shape)
    elif array.ndim == 3:
        raise UserError(f"mask {path} is a colour image; give every class its colour in classes.txt, or store "
                        "class indices (see README)")
    if array.max(initial=0) > IGNORE or array.min(initial=0) < 0:
        raise UserError(f"mask {path} has the value {int(array.max())}, neither a class nor {IGNORE}")
    if size is not None and array.shape != tuple(size):
        turned = (" (its sides swapped: an image with an EXIF orientation, as phones write, is read turned, as a "
                  "viewer shows it, and its mask must be too)") if array.shape == tuple(size)[::-1] else ""
        raise UserError(f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is {size[1]}x{size[0]}"
                        f"{turned}; a mask must be the size of its image")
    if label_table is not None:
        mapped = label_table[array.astype(np.int64)]
        if (mapped < 0).any():
            raise UserError(f"mask {path} has the value {int(array[mapped < 0][0])}, which is no class's; correct the "
                            "mask or the class list")
        array = mapped
    bad = array[(array >= num_classes) & (array != IGNORE)] if num_classes else []
    if len(bad):
        raise UserError(f"mask {path} has the value {int(bad[0])}, neither a class (0-{num_classes - 1}) nor {IGNORE} "
                        "(ignore); correct the mask or the class list")
    return tv_tensors.Mask(torch.from_numpy(array.astype(np.uint8)))


class SegmentationDataset(torch.utils.data.Dataset):
    """(uint8 image, int64 mask, index) of a list of ids, through an optional joint transform. `masks` (id -> file:
    pseudo-masks) replaces the true ones; a missing mask is all 255 if masks_optional."""

    def __init__(self, description, ids, transform=None, masks=None, masks_optional=False):
        self.description, self.ids, self.transform = description, ids, transform
        self.masks, self.masks_optional = masks, masks_optional

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        d, image_id = self.description, self.ids[index]
        image = read_image(d.images[image_id])
        path = (d.masks if self.masks is None else self.masks).get(image_id)
        if path is None or not os.path.exists(path):
            if not self.masks_optional:
                raise UserError(f"image {image_id} has no mask {path or ''}".rstrip())
            return image, tv_tensors.Mask(torch.full(image.shape[-2:], IGNORE, dtype=torch.uint8))
        table, colours = (d.label_table, d.colours) if self.masks is None else (None, None)
        return image, read_mask(path, len(d.class_names), image.shape[-2:], table, colours)

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long(), index


# ============================================================================= the model

class SegmentationModel(nn.Module):
    """A backbone split before its last stage, the main head g, and an auxiliary head: 'separate' (ĝ) with a new,
    half-width last stage of its own fed by the stage before, or 'shared' (g̃) on the last stage."""

    NEW_LAYERS = ("head.", "aux_head.", "aux_last_stage.")  # trained at the heads' learning rate

    def __init__(self, lower, last_stage, head, aux_last_stage=None, aux_head=None):
        super().__init__()
        self.lower, self.last_stage, self.head = lower, last_stage, head
        self.aux_last_stage, self.aux_head = aux_last_stage, aux_head

    def forward(self, x, with_aux=False):
        """Main-head logits at the input's size; with_aux: (main logits, auxiliary logits)."""
        lower = self.lower(x)
        features = self.last_stage(lower)
        out = F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not with_aux:
            return out
        if self.aux_head is None:
            raise ValueError("this model has no auxiliary head")
        aux_features = self.aux_last_stage(lower) if self.aux_last_stage is not None else features
        return out, F.interpolate(self.aux_head(aux_features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(backbone, num_classes, weights="imagenet", aux_head=None):
    """DeepLabv3 (torchvision's ResNet at output stride 8, its ASPP head) or the demo's tiny U-Net, from
    'imagenet' weights, 'coco' (the backbone of torchvision's COCO DeepLabv3, the paper's) or 'none'."""
    if backbone == "tiny_unet":  # the CPU demo's model
        if weights != "none":
            raise UserError("--backbone tiny_unet has no pretrained weights: add --no-pretrained")
        lower, last_stage, width, make_head = TinyUNet(), TinyUNetLastStage(), 16, tiny_head
        aux_last_stage = TinyUNetLastStage(out_channels=8) if aux_head == "separate" else None
    elif backbone in ("resnet50", "resnet101"):
        lower, last_stage = resnet_backbone(backbone, weights)
        width, make_head, aux_last_stage = 2048, DeepLabHead, None
        if aux_head == "separate":  # ĝ's stage: 3 Bottlenecks of 256 planes on layer3's output, dilated as layer4
            blocks = [torchvision.models.resnet.Bottleneck(1024, 256, dilation=d) for d in (2, 4, 4)]
            aux_last_stage = nn.Sequential(*blocks)
            for m in aux_last_stage.modules():  # initialised as torchvision's ResNets are
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    else:
        raise UserError(f"--backbone {backbone}: choose one of {', '.join(BACKBONES)}")
    aux_width = width // 2 if aux_head == "separate" else width
    return SegmentationModel(lower, last_stage, make_head(width, num_classes), aux_last_stage,
                             make_head(aux_width, num_classes) if aux_head else None)


def resnet_backbone(backbone, weights):
    """(lower stages, layer4) of a torchvision ResNet at output stride 8; a failed download is one line."""
    seg = torchvision.models.segmentation
    try:
        if weights == "coco":
            builder, coco = {"resnet50": (seg.deeplabv3_resnet50, seg.DeepLabV3_ResNet50_Weights),
                             "resnet101": (seg.deeplabv3_resnet101, seg.DeepLabV3_ResNet101_Weights)}[backbone]
            net = builder(weights=coco.COCO_WITH_VOC_LABELS_V1).backbone
        else:
            imagenet = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1 if weights == "imagenet" else None
            dilation = [False, True, True]  # output stride 8
            net = torchvision.models.get_model(backbone, weights=imagenet, replace_stride_with_dilation=dilation)
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        raise UserError(f"cannot download the {weights} weights ({e}); put the file in "
                        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or add --no-pretrained") from None
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3), net.layer4


# The CPU demo's model, split as the DeepLab models are (lower stages, last stage, head), so that both auxiliary
# heads work unchanged: ĝ's last stage is a new last block half as wide.

class TinyUNet(nn.Module):
    """The CPU demo's U-Net (16-128 channels) but its last stage; returns (1/2-resolution features, full skip)."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList(double_conv(a, b) for a, b in zip((3,) + widths[:-1], widths))
        self.up = nn.ModuleList(double_conv(widths[i + 1] + widths[i], widths[i]) for i in range(1, len(widths) - 1))

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[1:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return x, skips[0]


class TinyUNetLastStage(nn.Module):
    """The tiny U-Net's last block (ĝ's half as wide); each joins the skip itself (sharing it changes the rounding)."""

    def __init__(self, out_channels=16):
        super().__init__()
        self.block = double_conv(32 + 16, out_channels)

    def forward(self, features):
        x, skip = features
        return self.block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))


def double_conv(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True))


def tiny_head(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(True),
                         nn.Conv2d(32, num_classes, 1))


def final_weights(checkpoint):
    """The weights a checkpoint stands for: its mean teacher's (a multi-task stage's; the paper's final model is the
    teacher's main head), else its model's."""
    return checkpoint.get("teacher", checkpoint["model"])


def model_from_checkpoint(checkpoint, path, device=torch.device("cpu")):
    """The checkpoint's model (its mean teacher where it has one) on the device, in eval mode."""
    args = checkpoint["args"]
    model = build_model(args["backbone"], len(checkpoint["class_names"]), "none", args.get("aux_head"))
    try:
        model.load_state_dict(final_weights(checkpoint))
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit a {args['backbone']} model with "
                        f"{len(checkpoint['class_names'])} classes; the checkpoint is damaged or from another "
                        "version") from None
    model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model  # the tensor cores' layout


# ============================================================================= predicting whole images
# Validation during training, the pseudo-masks and evaluate.py all predict whole images this way.

def image_size(path, read_all=False):
    """(height, width) of an image as read_image gives it, from its header (EXIF orientations 5-8 swap the sides).
    read_all: also read the whole file, so that a truncated or damaged one is named now, not in the middle of a run
    (fast: a PNG's checksums are checked without decoding it, a JPEG is decoded at an eighth of its size)."""
    try:
        with Image.open(path) as image:
            size = image.size if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else image.size[::-1]
            png = image.format == "PNG"
            if read_all and not png:
                image.draft("RGB", (image.width // 8, image.height // 8))  # a JPEG's own reduced decoding
                image.load()
        if read_all and png:
            with Image.open(path) as image:  # verify() must come first after opening
                image.verify()
        return size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; replace it, or move it out of the data") from None


def full_image_loader(dataset, batch_size, workers, rank=0, world=1, scale=1.0):
    """Whole images in batches of one size (ASPP's image pooling would average over padding), every world-th from
    `rank`; resized by `scale`, each must keep MIN_SIDE pixels a side."""
    by_size = {}
    for index in range(rank, len(dataset.ids), world):
        path = dataset.description.images[dataset.ids[index]]
        size = image_size(path)
        if min(size) * scale < MIN_SIDE:
            raise UserError(f"image {path} is {size[1]}x{size[0]}: at scale {scale:g} too small for the model "
                            f"(at least {MIN_SIDE} pixels a side); check --image-scale")
        by_size.setdefault(size, []).append(index)
    batches = [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,  # a generator of its own:
                                       pin_memory=torch.cuda.is_available(), generator=torch.Generator())  # see train


@torch.no_grad()
def image_probs(model, images, scale=1.0, amp=False, head=0):
    """Class probabilities (head 1: the auxiliary head's) of whole images, the model seeing them at `scale`."""
    resized = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False), autocast(images.device, amp):  # sizes vary
        out = (model(resized, with_aux=True)[1] if head == 1 else model(resized)).float()
    return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False).softmax(1)


# ============================================================================= the metric

class ConfusionMatrix:
    """Rows: true class, columns: predicted class, summed over a whole set; 255 is ignored."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target, prediction):
        n, keep = self.num_classes, target != IGNORE
        counts = torch.bincount(n * target[keep].long() + prediction[keep].long(), minlength=n * n)
        self.matrix += counts.reshape(n, n).cpu()

    def iou(self):
        """Per-class IoU in percent; NaN for a class absent from both truth and prediction (0/0)."""
        m = self.matrix.double()
        return (100 * m.diag() / (m.sum(0) + m.sum(1) - m.diag())).tolist()

    def miou(self):
        """Mean IoU over the classes with a non-zero union, in percent."""
        present = [x for x in self.iou() if not math.isnan(x)]
        return sum(present) / len(present) if present else float("nan")

    def report(self, class_names):
        """For JSON: a class without IoU is null; without any, mIoU too, with a note why."""
        per_class = {name: None if math.isnan(x) else x for name, x in zip(class_names, self.iou())}
        if math.isnan(self.miou()):
            return {"miou": None, "note": "no pixel with a true label: no IoU to measure", "per_class": per_class}
        return {"miou": self.miou(), "per_class": per_class}


def iou_table(confusion, class_names):
    """A confusion matrix's per-class IoU and mIoU, a line each."""
    width = max(len(name) for name in class_names)
    lines = [f"  {name:<{width}}  " + ("   n/a" if math.isnan(x) else f"{x:6.2f}")
             for name, x in zip(class_names, confusion.iou())]
    return "\n".join(lines + [f"  {'mIoU':<{width}}  {confusion.miou():6.2f}"])
