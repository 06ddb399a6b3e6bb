"""What two or more of the scripts share. Sections: files and output folders (one-line errors, atomic
writes, checkpoints, the record that keeps runs apart); devices and processes; datasets (VOC, Cityscapes,
your own folder); augmentation (the weak view, the authors' S); the model (DeepLabv3 with the auxiliary
heads, the demo's tiny U-Net); metric and prediction. How a training run goes is stage1_train.py's."""
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
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
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
BACKBONES = ["resnet101", "resnet50", "tiny_unet"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8  # the shortest image side the models take (the tiny U-Net halves it three times)
RECORD = "run.json"  # in every output folder: the script that wrote it and the recipe it was made with


# ============================================================================= files and output folders

class UserError(Exception):
    """A mistake in the user's input or files: reported as one line, without a traceback."""


def run_main(main):
    """Run a script's main(); a UserError (also one raised in a DataLoader worker) becomes one line."""
    try:
        main()
    except UserError as e:  # a worker's error comes with the worker's traceback in its text: keep the last line
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])
    except KeyboardInterrupt:
        sys.exit("interrupted: the same command again continues where it stopped")
    finally:
        if dist.is_initialized():  # under torchrun: left to the interpreter's exit, its threads may abort the process
            dist.destroy_process_group()


def atomic_write(path, write_fn):
    """Write a file through write_fn(temporary path), then rename it into place: never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def is_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder).rstrip(os.sep)
    return path == folder or path.startswith(folder + os.sep)


def open_output(folder, flag, script, reads=()):
    """The record of `script`'s output folder (None: new or empty); refuses any other, or one inside what it reads."""
    for source in reads:
        if is_inside(folder, source):
            raise UserError(f"{flag} {folder} is inside {source}, which this command reads; choose a folder outside it")
    if os.path.isfile(os.path.join(folder, RECORD)):
        return read_record(folder, flag, script)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder")
    if os.path.isdir(folder) and os.listdir(folder):
        raise UserError(f"{flag} {folder} holds files that {script} did not write ({sorted(os.listdir(folder))[0]}, "
                        "...); choose a new or empty folder")
    return None


def read_record(folder, flag, script):
    try:
        record = json.loads(Path(folder, RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("script") != script:
        raise UserError(f"{flag} {folder} holds no outputs of {script} (its {RECORD} is missing, damaged or another "
                        "script's); choose another folder")
    return record


def write_record(folder, flag, record):
    """Create an output folder with its record first: it claims the folder and shows it is writable."""
    try:
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, RECORD), record)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror}); choose another folder") from None


def check_same_recipe(recorded, recipe, folder, advice):
    """Refuse to continue or redo a run of another recipe in `folder`, naming the first setting that differs."""
    for key in sorted(set(recorded) | set(recipe)):
        if recorded.get(key) != recipe.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{folder} was made with {flag} {recorded.get(key)}, this command asks for "
                            f"{flag} {recipe.get(key)}; {advice}")


def check_finite_floats(args):
    """argparse's float() takes NaN and infinity: refuse them for every flag."""
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"--{name.replace('_', '-')} {value}: NaN and infinity are not allowed")


def default_workers():
    """Data-loading processes: up to 8, no more than this process's share of the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path, flag="--checkpoint"):
    """(checkpoint, its path), from a file or a run folder, loaded without unpickling arbitrary objects."""
    if os.path.isfile(os.path.join(path, "checkpoint.pt")):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} not found" + (" (a folder without checkpoint.pt)" if os.path.isdir(path) else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, a pickle with foreign objects, a truncated file...
        raise UserError(f"{flag} {path} is not a checkpoint of this project, or is damaged: it cannot be loaded "
                        "with weights_only=True (nothing in it was unpickled)") from None
    if not isinstance(checkpoint, dict) or not {"model", "args", "labeled", "unlabeled", "class_names"} <= set(checkpoint):
        raise UserError(f"{flag} {path} is not a checkpoint of this project (stage1_train.py or stage3_multitask.py)")
    return checkpoint, path


# ============================================================================= devices and processes
# One process per GPU under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), as torchvision's references/segmentation/utils.py.

def init_distributed_mode(args):
    """Sets args.distributed, rank, world_size; joins torchrun's group (the first process prints); returns the device."""
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
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else contextlib.nullcontext()


def images_to_device(images, device, channels_last=False):
    """A loader's uint8 images (a quarter of float's bytes to copy) on the device, normalised as ImageNet's."""
    images = images.to(device, non_blocking=True)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True),
                                   [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


# ============================================================================= datasets
# VOC, Cityscapes and your own folder are three functions that fill in one DataDescription: where
# each image and mask is, how mask values map to classes, which ids train and which validate.

@dataclasses.dataclass
class DataDescription:
    kind: str               # "voc", "cityscapes" or "folder"
    root: str
    class_names: list
    palette: list           # flattened RGB triples, for the palette PNGs written
    images: dict            # id -> image file, for every training and val image
    masks: dict             # id -> mask file, or None for an image without one
    train_ids: list         # every training image (sorted); never a val image
    val_ids: list
    pool: list              # what stage 1's --labeled N draws from (VOC's classic protocol: train.txt)
    label_table: object = None  # numpy lookup from a mask's values to classes (-1: invalid)
    colours: dict = None        # your own data: {(r, g, b): class} for colour masks, from classes.txt
    notes: list = dataclasses.field(default_factory=list)  # what the start of a run says about the data


def describe_dataset(root, flag="--data-root"):
    """Recognise the dataset from its folder: VOC2012 or Cityscapes as distributed, or your own."""
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root} is not a folder (VOC2012, Cityscapes or your own data; see README)")
    for folder, describe in [("leftImg8bit", cityscapes), ("JPEGImages", voc), ("images", own_data)]:
        if os.path.isdir(os.path.join(root, folder)):
            return describe(root, flag)
    raise UserError(f"{flag} {root} is neither a VOC2012 folder (JPEGImages/), a Cityscapes folder (leftImg8bit/), "
                    "nor your own data (images/, masks/, classes.txt); see README")


def voc(root, flag):
    """VOC2012 with SBD's masks (SegmentationClassAug, else SegmentationClass); training ids from
    train_aug.txt, else SegmentationClassAug, else train.txt; never a val id."""
    def ids(name):
        path = os.path.join(root, "ImageSets", name)
        return [line.split()[0] for line in read_lines(path)] if os.path.exists(path) else None
    val_ids, voc_train = ids("Segmentation/val.txt"), ids("Segmentation/train.txt") or []
    if val_ids is None:
        raise UserError(f"{flag} {root} has no ImageSets/Segmentation/val.txt: is it the VOC2012 folder? (see README)")
    aug = os.path.join(root, "SegmentationClassAug")
    train_ids = ids("SegmentationAug/train_aug.txt") or ([name[:-4] for name in os.listdir(aug) if name.endswith(".png")]
                                                         if os.path.isdir(aug) else voc_train)
    train_ids = sorted(set(train_ids) - set(val_ids))
    masks = {i: os.path.join(root, "SegmentationClass", f"{i}.png") for i in train_ids + val_ids}
    for i in train_ids:  # a training image's SBD mask where it has one
        masks[i] = os.path.join(aug, f"{i}.png") if os.path.exists(os.path.join(aug, f"{i}.png")) else \
            masks[i] if os.path.exists(masks[i]) else None
    classes = os.path.join(root, "classes.txt")
    names, colours = read_classes(classes) if os.path.exists(classes) else (list(VOC_CLASSES), None)
    return DataDescription("voc", root, names, colour_palette(colours),
                           {i: os.path.join(root, "JPEGImages", f"{i}.jpg") for i in train_ids + val_ids}, masks,
                           train_ids, val_ids, pool=sorted(set(voc_train) - set(val_ids)))


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
            masks[image_id] = next((gt + k for k in ["labelIds.png", "labelTrainIds.png"] if os.path.exists(gt + k)), None)
    table = np.full(256, -1, dtype=np.int16)
    for c in torchvision.datasets.Cityscapes.classes:
        table[max(c.id, 0)] = c.train_id if 0 <= c.train_id < IGNORE else IGNORE
    classes = sorted((c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE), key=lambda c: c.train_id)
    palette = [value for c in classes for value in c.color]
    return DataDescription("cityscapes", root, [c.name for c in classes], palette + [0] * (768 - len(palette)), images,
                           masks, sorted(ids_of["train"]), sorted(ids_of["val"]), sorted(ids_of["train"]),
                           label_table=table if any(p and p.endswith("labelIds.png") for p in masks.values()) else None)


def own_data(root, flag):
    """Your own data: images/ (any depth; the path below it without extension is the id), masks/<id>.png
    where there is one, classes.txt, and val.txt, else a seeded fifth of the masked images."""
    if not os.path.exists(os.path.join(root, "classes.txt")):
        raise UserError(f"{root}/classes.txt not found: list the classes there, one a line, background first (see README)")
    names, colours = read_classes(os.path.join(root, "classes.txt"))
    images, masks = {}, {}
    for folder, files in [("images", images), ("masks", masks)]:
        for path in list_images(os.path.join(root, folder), IMAGE_EXTENSIONS if folder == "images" else ""):
            image_id = os.path.splitext(os.path.relpath(path, os.path.join(root, folder)))[0].replace(os.sep, "/")
            if image_id in files:
                raise UserError(f"{files[image_id]} and {path} have the same id {image_id}; rename one of them")
            if folder == "masks" and (image_id not in images or not path.endswith(".png")):
                raise UserError(f"{path}: a mask must be masks/<id>.png for an image images/<id>.<extension>; rename it")
            files[image_id] = path
    if len(masks) < 2:
        raise UserError(f"{flag} {root} has {len(masks)} masks in masks/; at least two are needed (to train, to validate)")
    notes = [f"masks: {len(masks)} of the {len(images)} images have one; the others are unlabelled"]
    if os.path.exists(os.path.join(root, "val.txt")):
        val_ids = sorted({image_id_of(line, images) for line in read_lines(os.path.join(root, "val.txt"))})
        for image_id in val_ids:
            if image_id not in masks:
                what = "has no mask in masks/ (a val image needs one)" if image_id in images else "is no image in images/"
                raise UserError(f"{root}/val.txt lists {image_id}, which {what}")
        notes.append(f"val: the {len(val_ids)} images of val.txt")
    else:
        val_ids = sorted(random.Random(0).sample(sorted(masks), max(1, len(masks) // 5)))
        notes.append(f"val: {len(val_ids)} of the {len(masks)} masked images, a seeded fifth (no val.txt)")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # every mask's values, to tell binary masks apart
        values = dict(zip(masks, pool.map(lambda path: set(read_mask(path, colours=colours).unique().tolist()), masks.values())))
    table = None
    if len(names) == 2 and set().union(*values.values()) == {0, IGNORE}:  # 0/255 masks: 255 is the foreground here
        table = np.array([0] + [-1] * 254 + [1], dtype=np.int16)  # 0 -> class 0, 255 -> class 1, the rest invalid
        notes.append("masks: only the values 0 and 255, with two classes: read as background (0) and foreground (255)")
    bad = [(i, v) for i, found in values.items() for v in sorted(found) if v >= len(names) and v != IGNORE]
    if bad:  # (binary masks have none)
        raise UserError(f"mask {masks[bad[0][0]]} has the value {bad[0][1]}, neither a class (0-{len(names) - 1}) "
                        f"nor {IGNORE} (ignore); see classes.txt")
    train_ids = sorted(set(images) - set(val_ids))
    return DataDescription("folder", root, names, colour_palette(colours), images, {i: masks.get(i) for i in images},
                           train_ids, val_ids, [i for i in train_ids if i in masks], table, colours, notes)


def read_classes(path):
    """(names, {colour: class} or None) of classes.txt: a class a line, background first, each with
    its colour in colour masks (R G B or #rrggbb) or none."""
    names, colours = [], []
    for words in (line.split() for line in read_lines(path)):
        colour = None
        if len(words) >= 4 and all(w.isdigit() and int(w) < 256 for w in words[-3:]):
            colour, words = tuple(int(w) for w in words[-3:]), words[:-3]
        elif len(words) >= 2 and re.fullmatch(r"#[0-9a-fA-F]{6}", words[-1]):
            colour, words = tuple(int(words[-1][i:i + 2], 16) for i in (1, 3, 5)), words[:-1]
        names.append(" ".join(words))
        colours.append(colour)
    if len(names) < 2:
        raise UserError(f"{path} lists {len(names)} class; it needs background and at least one more")
    if any(colours) and (not all(colours) or len(set(colours)) < len(colours)):
        raise UserError(f"{path}: give every class a colour of its own (R G B or #rrggbb), or none of them")
    return names, {colour: index for index, colour in enumerate(colours)} if any(colours) else None


def colour_palette(colours=None):
    """The palette of the PNGs written: PASCAL VOC's colour map, with the classes' colours from classes.txt."""
    palette = [[sum((i >> (3 * bit + channel) & 1) << (7 - bit) for bit in range(8)) for channel in range(3)]
               for i in range(256)]  # class i's bits dealt to R, G, B in turn, from the top bit down
    for colour, index in (colours or {}).items():
        palette[index] = list(colour)
    return [value for rgb in palette for value in rgb]


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """The files under a folder (any depth) with one of `extensions`, sorted; hidden ones (.DS_Store) left out."""
    return sorted(os.path.join(path, name) for path, _, names in os.walk(folder) for name in names
                  if name.lower().endswith(extensions) and not name.startswith("."))


def image_id_of(line, images):
    """The id a line of your own data's split files names: an id, or an image's path below images/."""
    word = line if line in images else line.split()[0].removeprefix("images/")
    return os.path.splitext(word)[0] if word not in images and word.lower().endswith(IMAGE_EXTENSIONS) else word


def read_image(path):
    """An RGB uint8 image as a viewer shows it: EXIF orientation, 16-bit grey scaled, transparency over white."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16-bit grey
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def read_mask(path, num_classes=None, size=None, label_table=None, colours=None):
    """A mask file's classes (255: ignore): index and palette PNGs as they are, RGB through `colours`
    (classes.txt) or as grey; label_table maps the values first (Cityscapes' labelIds, binary masks).
    Without num_classes: the file's values, unchecked."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            array = np.array(image.convert({"RGBA": "RGB", "LA": "L", "1": "L"}.get(image.mode, image.mode)))
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read mask {path}: {e}") from None
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
    if array.max(initial=0) > IGNORE:
        raise UserError(f"mask {path} has the value {int(array.max())}, neither a class nor {IGNORE}")
    if size is not None and array.shape != tuple(size):
        raise UserError(f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is {size[1]}x{size[0]}")
    if label_table is not None:
        mapped = label_table[array]
        if (mapped < 0).any():
            raise UserError(f"mask {path} has label id {int(array[mapped < 0][0])}, not one of the dataset's label ids")
        array = mapped
    bad = array[(array >= num_classes) & (array != IGNORE)] if num_classes else []
    if len(bad):
        raise UserError(f"mask {path} has label {int(bad[0])}, neither a class (0-{num_classes - 1}) nor {IGNORE}")
    return tv_tensors.Mask(torch.from_numpy(array.astype(np.uint8)))


def save_mask_png(path, mask, palette):
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(palette)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


class SegmentationDataset(torch.utils.data.Dataset):
    """(uint8 image, int64 mask, index) of a list of ids, through an optional joint transform. `masks`
    (id -> file: pseudo-masks) replaces the true ones; a missing mask is all 255 if masks_optional."""

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


def full_image_loader(dataset, batch_size, workers, rank=0, world=1, scale=1.0):
    """Whole images in batches of one size (ASPP's image pooling would average over padding), every
    world-th from `rank`; resized by `scale`, each must keep MIN_SIDE pixels a side."""
    by_size = {}
    for index in range(rank, len(dataset.ids), world):
        path = dataset.description.images[dataset.ids[index]]
        try:
            with Image.open(path) as image:  # the header alone; EXIF orientations 5-8 swap the sides
                size = image.size if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else image.size[::-1]
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        if min(size) * scale < MIN_SIDE:
            raise UserError(f"image {path} is {size[1]}x{size[0]}: at scale {scale:g} too small for the model "
                            f"(at least {MIN_SIDE} pixels a side); check --image-scale")
        by_size.setdefault(size, []).append(index)
    batches = [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=torch.cuda.is_available())


# ============================================================================= augmentation

def weak_augment(crop_size, scale_range):
    """The weak view, moving an image and its masks alike: random scale, crop (masks padded with 255), flip."""
    crop_and_flip = v2.Compose([v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
                                v2.RandomHorizontalFlip()])

    def transform(image, *masks):
        scale = random.uniform(*scale_range)
        if scale != 1:  # masks: nearest
            size = [max(1, round(side * scale)) for side in image.shape[-2:]]
            image, *masks = [v2.functional.resize(x, size, antialias=True) for x in (image, *masks)]
        return crop_and_flip(image, *masks)
    return transform


# The authors' S (their randaugment_seg.py): the 14 operations of RandAugment. Levels are 1-9 of 10.
STRONG_OPERATIONS = ["Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast", "Brightness",
                     "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize"]
GREY = 127  # what the authors' S fills with: 0 in their [-1, 1] image range


def strong_augment(image, num_ops=3, cutouts=3):
    """The authors' S: `num_ops` operations drawn with replacement, each applied with probability 0.5 at
    a level of 1-9 (Rotate to 30 degrees, Shear to 0.3, Translate to 10 pixels at crop 321, either sign),
    then `cutouts` grey squares of 32 pixels at crop 321. Returns (image, source): source[y, x] is the
    flat input index of the pixel that landed at (y, x), -1 if from outside; warp() moves targets by it."""
    fn = v2.functional
    height, width = image.shape[-2:]
    crop_scale = math.sqrt(height * width) / 321
    source = tv_tensors.Mask(torch.arange(height * width).reshape(height, width))
    for name in random.choices(STRONG_OPERATIONS, k=num_ops):
        level, sign = random.randint(1, 9), random.choice([-1, 1])
        if random.random() >= 0.5 or name == "Identity":
            continue
        if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            shear = math.degrees(math.atan(sign * level * 0.03))
            geometry = {"Rotate": dict(angle=sign * int(level * 3)),
                        "ShearX": dict(shear=[shear, 0.0], center=[0, 0]), "ShearY": dict(shear=[0.0, shear], center=[0, 0]),
                        "TranslateX": dict(translate=[sign * round(level * crop_scale), 0]),
                        "TranslateY": dict(translate=[0, sign * round(level * crop_scale)])}[name]
            # Nearest, as the authors' PIL operations; it also keeps the source map exact.
            params = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=v2.InterpolationMode.NEAREST)
            image, source = fn.affine(image, **(params | geometry), fill=GREY), fn.affine(source, **(params | geometry), fill=-1)
        elif name in ("AutoContrast", "Equalize"):
            image = fn.autocontrast(image) if name == "AutoContrast" else fn.equalize(image)
        elif name == "Solarize":
            image = fn.solarize(image, threshold=256 - int(level * 25.6))
        elif name == "Posterize":
            image = fn.posterize(image, bits=4 - int(level * 0.4))
        else:  # PIL's enhancers at a factor of 0.28-1.72
            adjust = {"Color": fn.adjust_saturation, "Contrast": fn.adjust_contrast,
                      "Brightness": fn.adjust_brightness, "Sharpness": fn.adjust_sharpness}[name]
            image = adjust(image, level * 0.18 + 0.1)
    image = image.clone()
    side = max(1, round(32 * crop_scale))
    for _ in range(cutouts):  # centres anywhere, squares clipped at the border, as the authors'
        y, x = random.randrange(height), random.randrange(width)
        image[..., max(0, y - side // 2):y + side // 2, max(0, x - side // 2):x + side // 2] = GREY
    return image, source.as_subclass(torch.Tensor)


def warp(target, source):
    """A target (H, W) or (N, H, W) of the unwarped view moved by S's source map; 255 where it came from outside."""
    moved = target.flatten(-2).gather(-1, source.clamp(min=0).flatten(-2).to(target.device)).view(source.shape)
    return moved.masked_fill(source.to(moved.device) < 0, IGNORE)


# ============================================================================= the model

class SegmentationModel(nn.Module):
    """A backbone split before its last stage, the main head g, and an auxiliary head: 'separate' (ĝ)
    with a new, half-width last stage of its own fed by the stage before, or 'shared' (g̃) on the last stage."""

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
    if backbone == "tiny_unet":
        if weights != "none":
            raise UserError("--backbone tiny_unet has no pretrained weights: add --no-pretrained")
        lower, last_stage, width, make_head = TinyUNet(), TinyUNetLastStage(), 16, tiny_head
        aux_last_stage = TinyUNetLastStage(out_channels=8) if aux_head == "separate" else None
    elif backbone in ("resnet50", "resnet101"):
        lower, last_stage = resnet_backbone(backbone, weights)
        width, make_head, aux_last_stage = 2048, DeepLabHead, None
        if aux_head == "separate":  # ĝ's stage: 3 Bottlenecks of 256 planes on layer3's output, dilated as layer4
            aux_last_stage = nn.Sequential(*[torchvision.models.resnet.Bottleneck(1024, 256, dilation=d) for d in (2, 4, 4)])
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
            net = torchvision.models.get_model(backbone, weights=imagenet, replace_stride_with_dilation=[False, True, True])
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        raise UserError(f"cannot download the {weights} weights ({e}); put the file in "
                        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or add --no-pretrained") from None
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3), net.layer4


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
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def tiny_head(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         nn.Conv2d(32, num_classes, 1))


# ============================================================================= metric and prediction

class ConfusionMatrix:
    """Rows: true class, columns: predicted class, summed over a whole set; 255 is ignored."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target, prediction):
        n, keep = self.num_classes, target != IGNORE
        self.matrix += torch.bincount(n * target[keep].long() + prediction[keep].long(), minlength=n * n).reshape(n, n).cpu()

    def iou(self):
        """Per-class IoU in percent; NaN for a class absent from both truth and prediction (0/0)."""
        m = self.matrix.double()
        return (100 * m.diag() / (m.sum(0) + m.sum(1) - m.diag())).tolist()

    def miou(self):
        """Mean IoU over the classes with a non-zero union, in percent."""
        present = [x for x in self.iou() if not math.isnan(x)]
        return sum(present) / len(present) if present else float("nan")

    def report(self, class_names):
        return {"miou": self.miou(), "per_class": {n: (None if math.isnan(x) else x) for n, x in zip(class_names, self.iou())}}

    def table(self, class_names):
        width = max(len(name) for name in class_names)
        lines = [f"  {name:<{width}}  {'   n/a' if math.isnan(x) else f'{x:6.2f}'}" for name, x in zip(class_names, self.iou())]
        return "\n".join(lines + [f"  {'mIoU':<{width}}  {self.miou():6.2f}"])


@torch.no_grad()
def predict(model, images, scale=1.0, amp=False, head=0):
    """Class probabilities (head 1: the auxiliary head's) of whole images, the model seeing them at `scale`."""
    resized = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False), autocast(images.device, amp):  # sizes vary: no benchmark
        out = (model(resized, with_aux=True)[1] if head == 1 else model(resized)).float()
    return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False).softmax(1)
