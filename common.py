"""The small shared part of the pipeline, in sections:

    errors and files        one-line errors for the user's mistakes, atomic writes, output folders
    several processes       torchrun helpers, after torchvision's references
    devices and speed       device choice, bf16 autocast, FLOP counting and the GPU's peak
    datasets and splits     how PASCAL VOC and Cityscapes are laid out, the split protocols, loaders
    augmentation            the weak view and the authors' strong augmentation S with its warp
    the model               DeepLabv3 (torchvision) with the auxiliary heads, and the demo's U-Net
    metric and prediction   the confusion matrix, full-image and sliding-window prediction, pictures
    checkpoints             safe loading, rebuilding a model
    training                what stages 1 and 3 share: flags, resume, optimiser, progress and history
"""
import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.transforms import v2

IGNORE = 255
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
BACKBONES = ["resnet101", "resnet50", "mobilenet_v3_large", "tiny_unet"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ============================================================================= errors and files

class UserError(Exception):
    """A mistake in the user's input or files: reported as one line, without a traceback."""


def run_main(main):
    """Run a script's main(); a UserError (also one raised in a DataLoader worker) becomes one line."""
    try:
        main()
    except UserError as e:
        # A worker's exception comes back with the worker's traceback in its text: keep the last line.
        message = str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        sys.exit(f"error: {message}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command (stage 1 and 3: add --resume) to continue")


def atomic_write(path, write_fn):
    """Write a file through write_fn(temp_path), then rename it into place: never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_ids(path, ids):
    write_text(path, "".join(f"{i}\n" for i in ids))


def make_dir(path, flag):
    """os.makedirs, with a folder that cannot be made (a file in the way, no permission) as one line."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created ({e.strerror}); choose another path") from None


def prepare_out_dir(out, resume):
    """Create the output folder; refuse to start a new run over an earlier run's checkpoint."""
    checkpoint = os.path.join(out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not resume:
        raise UserError(f"{checkpoint} exists: add --resume to continue that run, or choose another --out")
    if resume and not os.path.exists(checkpoint):
        raise UserError(f"--resume: no {checkpoint} to continue from")
    if is_main_process():
        make_dir(out, "--out")
    return checkpoint


def check_finite_floats(args):
    """NaN and infinity are refused for every float flag (argparse's float() accepts them)."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"--{name.replace('_', '-')} {value}: NaN and infinity are not allowed")


def default_workers():
    """Data-loading processes: up to 8, no more than this process's share of the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# ============================================================================= several processes
# One process per GPU, started by torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK), as in
# torchvision's references/segmentation/utils.py. A single process needs none of it.

def init_distributed_mode(args):
    """Join the process group when started by torchrun; sets args.distributed, rank, world_size, gpu."""
    args.rank, args.world_size, args.gpu = 0, 1, 0
    args.distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not args.distributed:
        return
    args.rank, args.world_size, args.gpu = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master):
    """Only the first process prints (print(..., force=True) prints from any)."""
    import builtins
    builtin_print = builtins.print

    def print(*args, **kwargs):
        if kwargs.pop("force", False) or is_master:
            builtin_print(*args, **kwargs)
    builtins.print = print


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def sum_over_processes(tensor):
    """The tensor summed over all processes (itself when alone); NCCL needs it on the GPU."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(on_device)
    return on_device.to(tensor.device)


def save_on_master(path, checkpoint):
    if is_main_process():
        save_checkpoint(path, checkpoint)


# ============================================================================= devices and speed

def pick_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try cuda, cuda:1 or cpu)") from None


def autocast(device, enabled):
    """bf16 autocast on CUDA when --amp is given (bf16 needs no gradient scaler); a no-op otherwise."""
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


# Dense peak TFLOP/s by the vendors' datasheets: (bf16, tf32). fp32 convolutions run as TF32 on these
# cards by PyTorch's default, so that is the peak an fp32 run is measured against.
GPU_PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "A100": (312, 156),
                   "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35), "RTX 4090": (165, 83)}


def peak_flops(device, amp):
    """The card's dense peak in FLOP/s for this precision, or None for a card not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in GPU_PEAK_TFLOPS.items():  # longer names first where one contains another
        if key in name:
            return 1e12 * (bf16 if amp else tf32)
    return None


def count_flops(fn):
    """FLOPs of fn() as torch's FlopCounterMode counts them (convolutions and matrix products, 2 per
    multiply-add). Run it on meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def speed_setup(model, device, channels_last):
    """cuDNN picks the fastest convolution for the fixed training crop; channels-last memory
    format suits the GPU's tensor cores. Neither changes results beyond floating-point noise."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(tensor, device, channels_last=False):
    """Host to device without waiting (the batch is in pinned memory); images optionally channels-last."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.dim() == 4 else tensor


# ============================================================================= datasets and splits
# A dataset is described in one place, DataDescription: where each image and mask file is, how a
# mask file's values map to classes, which ids are training and which val images. PASCAL VOC and
# Cityscapes are two short functions that fill it in; everything after them is the same code.

@dataclasses.dataclass
class DataDescription:
    name: str               # "voc" or "cityscapes"
    root: str
    class_names: list
    palette: list           # flattened RGB triples for the palette PNGs written
    images: dict            # id -> image file, for every training and val id
    masks: dict             # id -> true mask file; None for a training image without one
    train_ids: list         # every training image (sorted); never a val image
    val_ids: list
    classic_pool: list      # what --labeled N draws from under the classic protocol
    label_table: object     # numpy lookup from a mask file's values to class indices (-1: invalid), or None
    raw_masks: dict         # Cityscapes: id -> _gtFine_labelIds.png where present (the ego vehicle is found there)


def voc_palette():
    """The PASCAL VOC colour map, flattened for PIL's putpalette."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def describe_dataset(root):
    """Recognise the dataset from its folder: VOC2012 or Cityscapes, as they are distributed."""
    if not os.path.isdir(root):
        raise UserError(f"--data-root {root} is not a folder (expected the VOC2012 or the Cityscapes folder, see README)")
    if os.path.isdir(os.path.join(root, "leftImg8bit")):
        return cityscapes_description(root)
    if os.path.isdir(os.path.join(root, "JPEGImages")):
        return voc_description(root)
    raise UserError(f"--data-root {root} is neither a VOC2012 folder (JPEGImages/, ImageSets/Segmentation/) nor a "
                    "Cityscapes folder (leftImg8bit/, gtFine/); see README")


def voc_description(root):
    """VOC2012 with the SBD masks. Training ids: train_aug.txt, else every SegmentationClassAug
    mask, else VOC's train.txt; never a val id. Masks: SegmentationClassAug, else SegmentationClass."""
    val_list = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
    if not os.path.exists(val_list):
        raise UserError(f"--data-root {root} has no ImageSets/Segmentation/val.txt: is it the VOC2012 folder? (see README)")
    val_ids = read_plain_ids(val_list)
    val = set(val_ids)
    train_list = os.path.join(root, "ImageSets", "Segmentation", "train.txt")
    voc_train = [i for i in read_plain_ids(train_list) if i not in val] if os.path.exists(train_list) else []
    aug_list = os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt")
    aug_dir = os.path.join(root, "SegmentationClassAug")
    if os.path.exists(aug_list):
        train_ids = read_plain_ids(aug_list)
    elif os.path.isdir(aug_dir):
        train_ids = [os.path.splitext(name)[0] for name in os.listdir(aug_dir) if name.endswith(".png")]
    else:
        train_ids = voc_train
    train_ids = sorted(i for i in set(train_ids) if i not in val)

    def mask(image_id, folders):
        paths = [os.path.join(root, folder, f"{image_id}.png") for folder in folders]
        return next((p for p in paths if os.path.exists(p)), None)
    class_names = read_class_names(root)
    return DataDescription(
        name="voc", root=root, class_names=class_names, palette=palette_of("voc"),
        images={i: os.path.join(root, "JPEGImages", f"{i}.jpg") for i in train_ids + val_ids},
        masks={**{i: mask(i, ["SegmentationClassAug", "SegmentationClass"]) for i in train_ids},
               **{i: os.path.join(root, "SegmentationClass", f"{i}.png") for i in val_ids}},
        train_ids=train_ids, val_ids=val_ids, classic_pool=sorted(voc_train), label_table=None, raw_masks={})


def read_class_names(root):
    """classes.txt in the data root (one name a line, background first), else the 21 VOC classes."""
    path = os.path.join(root, "classes.txt")
    if not os.path.exists(path):
        return list(VOC_CLASSES)
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) < 2:
        raise UserError(f"{path} lists {len(names)} class; it needs background and at least one more")
    return names


def cityscapes_description(root):
    """Cityscapes: leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png with gtFine's
    <id>_gtFine_labelIds.png (the 34 raw ids, mapped to the 19 training classes by the official
    table that torchvision carries), or <id>_gtFine_labelTrainIds.png where only those exist."""
    if not os.path.isdir(os.path.join(root, "gtFine")):
        raise UserError(f"--data-root {root} has leftImg8bit/ but no gtFine/: Cityscapes needs both (see README)")
    images, raw, train_ids_files, ids_of = {}, {}, {}, {"train": [], "val": []}
    for split in ["train", "val"]:
        folder = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(folder):
            raise UserError(f"--data-root {root} has no leftImg8bit/{split}/ (see README)")
        for city in sorted(os.listdir(folder)):
            for name in sorted(os.listdir(os.path.join(folder, city))):
                if not name.endswith("_leftImg8bit.png"):
                    continue
                image_id = name[:-len("_leftImg8bit.png")]
                if image_id in images:
                    raise UserError(f"Cityscapes image {image_id} appears twice under {root}/leftImg8bit")
                images[image_id] = os.path.join(folder, city, name)
                ids_of[split].append(image_id)
                gt = os.path.join(root, "gtFine", split, city, image_id + "_gtFine_")
                raw[image_id] = gt + "labelIds.png" if os.path.exists(gt + "labelIds.png") else None
                train_ids_files[image_id] = gt + "labelTrainIds.png" if os.path.exists(gt + "labelTrainIds.png") else None
    classes = cityscapes_classes()
    # The official labelIds are read where present (always, in the distributed gtFine).
    use_raw = any(raw.values())
    table = np.full(256, -1, dtype=np.int16)
    for c in torchvision.datasets.Cityscapes.classes:
        if c.id >= 0:
            table[c.id] = c.train_id if 0 <= c.train_id < IGNORE else IGNORE
    return DataDescription(
        name="cityscapes", root=root, class_names=[c.name for c in classes], palette=palette_of("cityscapes"),
        images=images, masks=raw if use_raw else train_ids_files, train_ids=sorted(ids_of["train"]),
        val_ids=sorted(ids_of["val"]), classic_pool=sorted(ids_of["train"]), label_table=table if use_raw else None,
        raw_masks={i: p for i, p in raw.items() if p})


def cityscapes_classes():
    """The 19 training classes, in train-id order, from torchvision's copy of the official table."""
    return sorted((c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE), key=lambda c: c.train_id)


def palette_of(dataset):
    """The colours of a dataset's palette PNGs: Cityscapes' official ones, or VOC's."""
    if dataset != "cityscapes":
        return voc_palette()
    palette = [value for c in cityscapes_classes() for value in c.color]
    return palette + [0] * (768 - len(palette))


def read_plain_ids(path):
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


# The first word of a split-file line in each dataset's published form.
SPLIT_LINE_PREFIX = {"voc": "JPEGImages/", "cityscapes": "leftImg8bit/"}


def read_split_file(path, description, flag):
    """Image ids of a split file: bare ids, or the 'image mask' lines of the field's split files
    ('JPEGImages/x.jpg SegmentationClass/x.png', 'leftImg8bit/train/c/x_leftImg8bit.png gtFine/...')."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} not found")
    with open(path) as f:
        words = [line.split()[0] for line in f if line.strip()]
    if not words:
        raise UserError(f"{flag} {path} lists no image")
    for other, prefix in SPLIT_LINE_PREFIX.items():
        if other != description.name and words[0].startswith(prefix):
            raise UserError(f"{flag} {path} is a split file of {other}, but --data-root {description.root} "
                            f"is {description.name}; use a {description.name} split file (splits/README.md)")
    ids = [os.path.splitext(os.path.basename(word))[0].removesuffix("_leftImg8bit") for word in words]
    if len(set(ids)) != len(ids):
        raise UserError(f"{flag} {path} lists an image twice")
    return ids


def make_split(description, labeled, protocol="classic", seed=0, labeled_list=None, unlabeled_list=None):
    """The labelled and unlabelled training ids (both sorted), as METHOD.md's protocols define them.

    classic: `labeled` ids drawn from VOC's train.txt (Cityscapes: from the 2,975 train images);
    blended: drawn from all training ids. The unlabelled ids are every other training id, unless
    --unlabeled-list names them.
    """
    val, train = set(description.val_ids), set(description.train_ids)
    if labeled_list:
        labeled_ids = read_split_file(labeled_list, description, "--labeled-list")
        if labeled is not None and labeled != len(labeled_ids):
            raise UserError(f"--labeled {labeled} but --labeled-list {labeled_list} lists {len(labeled_ids)} images")
    else:
        if labeled is None:
            raise UserError("give --labeled N (the number of labelled images) or --labeled-list FILE")
        pool = description.classic_pool if protocol == "classic" else description.train_ids
        if not 1 <= labeled <= len(pool):
            raise UserError(f"--labeled {labeled}: the {protocol} protocol draws from {len(pool)} images; "
                            f"use a number from 1 to {len(pool)}")
        labeled_ids = random.Random(seed).sample(sorted(pool), labeled)
    labeled_set = set(labeled_ids)
    if unlabeled_list:
        unlabeled_ids = [i for i in read_split_file(unlabeled_list, description, "--unlabeled-list") if i not in labeled_set]
    else:
        unlabeled_ids = [i for i in description.train_ids if i not in labeled_set]

    for flag, ids in [("--labeled-list", labeled_ids), ("--unlabeled-list", unlabeled_ids)]:
        in_val = [i for i in ids if i in val]
        if in_val:
            raise UserError(f"{flag}: {len(in_val)} ids are val images (first: {in_val[0]}); training on them would leak val")
        for image_id in ids:
            if image_id not in train or not os.path.exists(description.images[image_id]):
                where = description.images.get(image_id, f"among the training images of {description.root}")
                raise UserError(f"split id {image_id} has no image {where}")
    for image_id in labeled_ids:
        if description.masks.get(image_id) is None:
            raise UserError(f"labelled id {image_id} has no mask in {description.root}")
    return sorted(labeled_ids), sorted(unlabeled_ids)


def split_of_run(args, description, checkpoint):
    """The split of a training run: drawn by the protocol, or read back from the run being resumed."""
    if checkpoint is not None:
        return checkpoint["labeled"], checkpoint["unlabeled"]
    return make_split(description, args.labeled, args.protocol, args.split_seed, args.labeled_list, args.unlabeled_list)


def read_image(path):
    """An RGB image as a uint8 tv_tensors.Image (C, H, W)."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def read_mask(path, num_classes, size, label_table=None):
    """Class indices of a palette or single-channel PNG (never via RGB), checked against the image.
    label_table maps a file's raw values to classes first (Cityscapes' labelIds)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise UserError(f"mask {path} is a {image.mode} image; masks must be palette or single-channel PNGs of class indices")
            array = np.array(image)
    except OSError as e:
        raise UserError(f"cannot read mask {path}: {e}") from None
    if array.shape != tuple(size):
        raise UserError(f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is {size[1]}x{size[0]}")
    if label_table is not None:
        mapped = label_table[array]
        if (mapped < 0).any():
            raise UserError(f"mask {path} has label id {int(array[mapped < 0][0])}, not one of the dataset's label ids")
        array = mapped.astype(np.uint8)
    bad = (array >= num_classes) & (array != IGNORE)
    if bad.any():
        raise UserError(f"mask {path} has label {int(array[bad][0])}, neither a class (0-{num_classes - 1}) nor {IGNORE}")
    return tv_tensors.Mask(torch.from_numpy(array))


def save_mask_png(path, mask, palette):
    """Write class indices as a palette PNG (the dataset's colours), atomically."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(palette)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def normalize(image):
    """uint8 image to the float input the ImageNet-pretrained backbones expect."""
    return v2.functional.normalize(v2.functional.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


class SegmentationDataset(torch.utils.data.Dataset):
    """Images of a list of ids with one mask each, through an optional joint transform.

    image_files and mask_files map ids to files; a missing mask reads as all-ignore when
    masks_optional, and is an error otherwise. Items: (normalized image, int64 mask, index).
    """

    def __init__(self, ids, image_files, mask_files, num_classes, label_table=None, transform=None, masks_optional=False):
        self.ids, self.image_files, self.mask_files = ids, image_files, mask_files
        self.num_classes, self.label_table = num_classes, label_table
        self.transform, self.masks_optional = transform, masks_optional

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        image_id = self.ids[index]
        image = read_image(self.image_files[image_id])
        path = self.mask_files.get(image_id)
        if path is None or not os.path.exists(path):
            if not self.masks_optional:
                raise UserError(f"image {image_id} has no mask {path or ''}".rstrip())
            return image, tv_tensors.Mask(torch.full(image.shape[-2:], IGNORE, dtype=torch.uint8))
        return image, read_mask(path, self.num_classes, image.shape[-2:], self.label_table)

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return normalize(image), mask.long(), index


def true_mask_dataset(description, ids, transform=None, masks_optional=False):
    """The dataset's images with their true masks."""
    return SegmentationDataset(ids, description.images, description.masks, len(description.class_names),
                               description.label_table, transform, masks_optional)


def val_dataset(description):
    for image_id in description.val_ids:
        if not os.path.exists(description.images[image_id]):
            raise UserError(f"val id {image_id} has no image {description.images[image_id]}")
    return true_mask_dataset(description, description.val_ids)


def same_size_batches(dataset, batch_size, rank=0, world=1):
    """Batches of indices whose images share one size, so full images batch without padding
    (padding would change the result: ASPP's image pooling averages over the padded area).
    With several processes, each takes every world-th image."""
    by_size = {}
    for index in range(rank, len(dataset.ids), world):
        path = dataset.image_files[dataset.ids[index]]
        try:
            with Image.open(path) as image:  # reads the header only
                by_size.setdefault(image.size, []).append(index)
        except OSError as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    return [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def full_image_loader(dataset, batch_size, workers):
    """Whole images, unaugmented, in same-size batches; this process's share of them."""
    batches = same_size_batches(dataset, batch_size, *rank_and_world())
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


class ShuffledStream(torch.utils.data.Sampler):
    """Indices forever: one seeded permutation of the dataset after another, so training counts
    steps, not epochs. The stream is the same in every process; process `rank` of `world` takes
    every world-th index, so a step's batches across processes are the one-process batch, and a
    resumed run starts at `start`, where the interrupted run stopped reading."""

    def __init__(self, size, seed, start=0, rank=0, world=1):
        self.size, self.seed, self.start, self.rank, self.world = size, seed, start, rank, world

    def __iter__(self):
        position = self.start
        epoch, offset = divmod(position, self.size)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for index in order[offset:].tolist():
                if position % self.world == self.rank:
                    yield index
                position += 1
            epoch, offset = epoch + 1, 0


def train_batches(dataset, total_batch, workers, seed, start_step=0):
    """An endless iterator of this process's share of each step's batch of `total_batch` images."""
    rank, world = rank_and_world()
    if total_batch % world:
        raise UserError(f"a batch of {total_batch} images cannot be shared by {world} processes; "
                        f"use a batch size divisible by {world} (README, 'Several GPUs')")
    stream = ShuffledStream(len(dataset), seed, start_step * total_batch, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=total_batch // world, sampler=stream, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)
    return iter(loader)


# ============================================================================= augmentation

def weak_augment(crop_size, scale_range):
    """The weak view: random scale (relative to the image), crop with padding (255 in masks),
    horizontal flip. Returns a function of (image, *masks) that moves them all the same way."""
    crop_and_flip = v2.Compose([
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(),
    ])

    def transform(image, *masks):
        scale = random.uniform(*scale_range)
        size = [max(1, round(side * scale)) for side in image.shape[-2:]]
        if scale != 1:
            image, *masks = [v2.functional.resize(x, size, antialias=True) for x in (image, *masks)]  # masks: nearest
        return crop_and_flip(image, *masks)
    return transform


# The authors' S (their randaugment_seg.py): the 14 operations of RandAugment. Levels are 1-9 of 10.
STRONG_OPERATIONS = ["Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast", "Brightness",
                     "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize"]
GREY = 127  # what the authors' S fills with: 0 in their [-1, 1] image range


def strong_augment(image, num_ops=3, cutouts=3):
    """The strong augmentation S of the authors: `num_ops` operations drawn with replacement from
    STRONG_OPERATIONS, each applied with probability 0.5 at a level drawn from 1-9 (Rotate up to 30
    degrees, Shear up to 0.3, Translate up to 10 pixels at crop 321, either sign), then `cutouts`
    grey squares of 32 pixels at crop 321. Translate and Cutout scale with the crop.

    Returns (image, source): source[y, x] is the flat index (row * width + column) in the input of
    the pixel that landed at (y, x), -1 where it came from outside. warp() moves targets with it.
    """
    fn = v2.functional
    nearest = v2.InterpolationMode.NEAREST  # as the authors' PIL operations, and keeps source exact
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
                        "ShearX": dict(shear=[shear, 0.0], center=[0, 0]),
                        "ShearY": dict(shear=[0.0, shear], center=[0, 0]),
                        "TranslateX": dict(translate=[sign * round(level * crop_scale), 0]),
                        "TranslateY": dict(translate=[0, sign * round(level * crop_scale)])}[name]
            params = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=nearest) | geometry
            image, source = fn.affine(image, **params, fill=GREY), fn.affine(source, **params, fill=-1)
        elif name == "AutoContrast":
            image = fn.autocontrast(image)
        elif name == "Equalize":
            image = fn.equalize(image)
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
    """A target of the unwarped view (H, W) or (N, H, W), moved through strong_augment's source map;
    255 where the pixel came from outside."""
    flat = target.flatten(-2)
    moved = flat.gather(-1, source.clamp(min=0).flatten(-2).to(flat.device)).view(source.shape)
    return moved.masked_fill(source.to(moved.device) < 0, IGNORE)


def labeled_augment(crop_size, scale_range, strong):
    """The labelled images' augmentation: the weak view, then with --strong-aug also S (the mask warped with it)."""
    weak = weak_augment(crop_size, scale_range)
    if not strong:
        return weak

    def transform(image, mask):
        image, mask = weak(image, mask)
        image, source = strong_augment(image)
        return image, tv_tensors.Mask(warp(mask, source))
    return transform


# ============================================================================= the model

class TinyUNet(nn.Module):
    """The CPU demo's backbone, learnable from scratch in minutes (README, "The offline demo"):
    4 levels of 16/32/64/128 channels, nearest upsampling with skip connections.

    forward returns (features at 1/2 resolution, full-resolution skip): the input of the last
    stage, TinyUNetLastStage.
    """

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        in_channels = 3
        for width in widths:
            self.down.append(double_conv(in_channels, width))
            in_channels = width
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
    def __init__(self, in_channels=32, skip_channels=16, out_channels=16):
        super().__init__()
        self.block = double_conv(in_channels + skip_channels, out_channels)

    def forward(self, features):
        x, skip = features
        return self.block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))


def double_conv(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


def tiny_head(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         nn.Conv2d(32, num_classes, 1))


class SegmentationModel(nn.Module):
    """A backbone split before its last stage, the main head g and an optional auxiliary head.

    'separate' (ĝ, paper stage 2): a new last stage of its own, half as wide and randomly
    initialised, fed by the stage before, with its own head. 'shared' (g̃, paper stage 3): a
    second head on the shared last-stage features.
    """

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
        aux = F.interpolate(self.aux_head(aux_features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out, aux

    NEW_LAYERS = ("head.", "aux_head.", "aux_last_stage.")

    def backbone_parameters(self):
        """The pretrained part: the lower stages and the last stage."""
        return [p for name, p in self.named_parameters() if not name.startswith(self.NEW_LAYERS)]

    def head_parameters(self):
        """The new layers, trained at the heads' learning rate: the heads and ĝ's own last stage."""
        return [p for name, p in self.named_parameters() if name.startswith(self.NEW_LAYERS)]


def init_new_layers(module):
    """torchvision's ResNet and MobileNet initialisation, for a stage built here from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def resnet_half_last_stage():
    """ĝ's last stage for the ResNets: three Bottleneck blocks of 256 planes (1,024 channels out),
    fed by layer3's 1,024 channels, dilated as our layer4 (2 in the first block, then 4)."""
    from torchvision.models.resnet import Bottleneck
    return init_new_layers(nn.Sequential(*[Bottleneck(1024, 256, dilation=d) for d in (2, 4, 4)]))


def mobilenet_half_last_stage():
    """ĝ's last stage for MobileNetV3-Large: its last stage (three inverted residual blocks and the
    1x1 convolution to 960 channels) at half the width, fed by the 112 channels of the stage before."""
    from functools import partial
    from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig, _mobilenet_v3_conf
    from torchvision.ops.misc import Conv2dNormActivation
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    blocks, in_channels = [], None
    for c in _mobilenet_v3_conf("mobilenet_v3_large", dilated=True)[0][-3:]:
        in_channels = c.input_channels if in_channels is None else in_channels
        blocks.append(InvertedResidual(InvertedResidualConfig(in_channels, c.kernel, c.expanded_channels // 2,
                                                              c.out_channels // 2, c.use_se, "HS" if c.use_hs else "RE",
                                                              c.stride, c.dilation, 1.0), norm))
        in_channels = c.out_channels // 2
    blocks.append(Conv2dNormActivation(in_channels, 6 * in_channels, 1, norm_layer=norm, activation_layer=nn.Hardswish))
    return init_new_layers(nn.Sequential(*blocks))


WEIGHTS = ["imagenet", "coco", "none"]


def build_model(backbone, num_classes, weights="imagenet", aux_head=None):
    """DeepLabv3 (torchvision's backbones at output stride 8, its ASPP head) or the demo's TinyUNet.

    weights: 'imagenet' (the field's protocol), 'coco' (torchvision's COCO-trained DeepLabv3
    backbone, the paper's starting point on VOC; the heads start fresh) or 'none'.
    aux_head: None, 'separate' (ĝ) or 'shared' (g̃).
    """
    if backbone == "tiny_unet":
        if weights != "none":
            raise UserError("--backbone tiny_unet has no pretrained weights: add --no-pretrained")
        lower, last_stage, width = TinyUNet(), TinyUNetLastStage(), 16
        half_stage, make_head = (lambda: TinyUNetLastStage(out_channels=8)), tiny_head
    elif backbone in ("resnet50", "resnet101", "mobilenet_v3_large"):
        lower, last_stage, width = torchvision_backbone(backbone, weights)
        half_stage = resnet_half_last_stage if backbone != "mobilenet_v3_large" else mobilenet_half_last_stage
        make_head = DeepLabHead
    else:
        raise UserError(f"--backbone {backbone}: choose one of {', '.join(BACKBONES)}")
    aux_last_stage = half_stage() if aux_head == "separate" else None
    aux_width = width // 2 if aux_head == "separate" else width
    model = SegmentationModel(lower, last_stage, make_head(width, num_classes), aux_last_stage,
                              make_head(aux_width, num_classes) if aux_head else None)
    if backbone == "mobilenet_v3_large":
        # torchvision's MobileNet BN momentum is 0.01: from scratch, eval-mode statistics lag far behind.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    return model


def torchvision_backbone(backbone, weights):
    """(lower stages, last stage, its width) of a torchvision backbone at output stride 8."""
    seg = torchvision.models.segmentation
    if weights == "coco":
        builder, coco = {"resnet50": (seg.deeplabv3_resnet50, seg.DeepLabV3_ResNet50_Weights),
                         "resnet101": (seg.deeplabv3_resnet101, seg.DeepLabV3_ResNet101_Weights),
                         "mobilenet_v3_large": (seg.deeplabv3_mobilenet_v3_large, seg.DeepLabV3_MobileNet_V3_Large_Weights)}[backbone]
        body = download_guard(lambda: builder(weights=coco.COCO_WITH_VOC_LABELS_V1).backbone, "COCO")
        net = body if backbone != "mobilenet_v3_large" else nn.Sequential(*body.values())
    elif backbone == "mobilenet_v3_large":
        imagenet = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1 if weights == "imagenet" else None
        net = download_guard(lambda: torchvision.models.mobilenet_v3_large(weights=imagenet, dilated=True), "ImageNet").features
    else:
        imagenet = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1 if weights == "imagenet" else None
        net = download_guard(lambda: torchvision.models.get_model(
            backbone, weights=imagenet, replace_stride_with_dilation=[False, True, True]), "ImageNet")
    if backbone == "mobilenet_v3_large":
        # As torchvision's deeplabv3_mobilenet_v3_large: the last stage starts at the last strided block.
        last_start = [i for i, block in enumerate(net) if getattr(block, "_is_cn", False)][-1]
        return net[:last_start], net[last_start:], net[-1].out_channels
    lower = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    return lower, net.layer4, 2048


def download_guard(build, which):
    """Build a torchvision model; a failed weights download becomes one line that says what to do."""
    try:
        return build()
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise UserError(f"cannot download the {which} weights ({e}); put the file in {cache} "
                        "or add --no-pretrained to train from scratch") from None


# ============================================================================= metric and prediction

class ConfusionMatrix:
    """Rows: true class, columns: predicted class, summed over a whole set; 255 is ignored."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target, prediction):
        n = self.num_classes
        keep = target != IGNORE
        counts = torch.bincount(n * target[keep].long() + prediction[keep].long(), minlength=n * n)
        self.matrix += counts.reshape(n, n).cpu()

    def iou(self):
        """Per-class IoU in percent; NaN for a class absent from both truth and prediction."""
        m = self.matrix.double()
        intersection = m.diag()
        union = m.sum(0) + m.sum(1) - intersection
        return (100 * intersection / union).tolist()  # 0/0 is NaN

    def miou(self):
        """Mean IoU over the classes with a non-zero union, in percent."""
        present = [x for x in self.iou() if not math.isnan(x)]
        return sum(present) / len(present) if present else float("nan")

    def report(self, class_names):
        """The per-class IoU as a dict (None for an absent class) and the mIoU, for metrics files."""
        return {"miou": self.miou(),
                "per_class": {name: (None if math.isnan(x) else x) for name, x in zip(class_names, self.iou())}}

    def table(self, class_names):
        """Per-class IoU and the mIoU as printable lines."""
        width = max(len(name) for name in class_names)
        lines = [f"  {name:<{width}}  {'   n/a' if math.isnan(x) else f'{x:6.2f}'}" for name, x in zip(class_names, self.iou())]
        return "\n".join(lines + [f"  {'mIoU':<{width}}  {self.miou():6.2f}"])


def window_starts(size, window, stride):
    """Tile positions along one side: every `stride`, the last one flush with the end."""
    if size <= window:
        return [0]
    return sorted(set(range(0, size - window, stride)) | {size - window})


@torch.no_grad()
def predict_probs(model, images, scales=(1.0,), flip=False, amp=False, head=0, window=None, stride=None):
    """Class probabilities of full images at their own size, averaged over the scales (and
    horizontal flips) asked for. head 1: the auxiliary head's. window (h, w) and stride (h, w):
    predict tile by tile, averaging the logits where tiles overlap, as the field does on
    Cityscapes' full-resolution images."""
    def logits_of(x):
        with autocast(x.device, amp):
            return (model(x, with_aux=True)[1] if head == 1 else model(x)).float()

    def tiled_logits_of(x):
        if window is None:
            return logits_of(x)
        height, width = x.shape[-2:]
        tile_h, tile_w = min(window[0], height), min(window[1], width)
        total, count = 0, torch.zeros(1, 1, height, width, device=x.device)
        for top in window_starts(height, tile_h, stride[0]):
            for left in window_starts(width, tile_w, stride[1]):
                tile = logits_of(x[..., top:top + tile_h, left:left + tile_w])
                total = total + F.pad(tile, (left, width - left - tile_w, top, height - top - tile_h))
                count[..., top:top + tile_h, left:left + tile_w] += 1
        return total / count

    size = images.shape[-2:]
    probs = 0
    with torch.backends.cudnn.flags(enabled=True, benchmark=False):  # full images come in many sizes
        for scale in scales:
            scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            for flipped in ([False, True] if flip else [False]):
                logits = tiled_logits_of(scaled.flip(-1) if flipped else scaled)
                logits = logits.flip(-1) if flipped else logits
                probs = probs + F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)
    return probs / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate(model, loader, device, num_classes, amp=False, head=0, image_scale=1.0):
    """Confusion matrix of full-image, single-scale predictions (at the scale the model was
    trained at), summed over every process's share of the images. head 1: the auxiliary head."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for images, masks, _ in loader:
        probs = predict_probs(model, to_device(images, device), scales=[image_scale], amp=amp, head=head)
        confusion.update(masks.to(device), probs.argmax(1))
    confusion.matrix = sum_over_processes(confusion.matrix)
    model.train(was_training)
    return confusion


# Pictures: coloured overlays of masks on their images, in a grid, with the library's drawing tools.

def overlay(image, mask, palette, alpha=0.55):
    """A uint8 image (3, H, W) with each class of mask (H, W) in the dataset's colour; 255 in white.
    Classes drawn in black in the palette (VOC's background) are left uncoloured."""
    classes = [int(c) for c in mask.unique() if c != IGNORE and any(palette[3 * int(c):3 * int(c) + 3])]
    colours = [tuple(palette[3 * c:3 * c + 3]) for c in classes]
    if (mask == IGNORE).any():
        classes.append(IGNORE)
        colours.append((255, 255, 255))
    if not classes:
        return image
    return torchvision.utils.draw_segmentation_masks(image, torch.stack([mask == c for c in classes]), alpha, colours)


def thumbnail(image, size=(160, 160)):
    """A uint8 image (3, H, W) scaled to fit size and centred on a dark grey background."""
    scale = min(size[0] / image.shape[-2], size[1] / image.shape[-1])
    shape = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
    small = v2.functional.resize(image, shape, antialias=True)
    top, left = (size[0] - shape[0]) // 2, (size[1] - shape[1]) // 2
    return v2.functional.pad(small, [left, top, size[1] - shape[1] - left, size[0] - shape[0] - top], fill=40)


def save_sheet(path, rows, titles):
    """A grid of thumbnails (rows of equal length) under a line of column titles, as a PNG."""
    grid = torchvision.utils.make_grid([panel for row in rows for panel in row], nrow=len(titles), padding=2, pad_value=255)
    sheet = Image.new("RGB", (grid.shape[-1], grid.shape[-2] + 16), "white")
    sheet.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, 16))
    draw = ImageDraw.Draw(sheet)
    column = grid.shape[-1] / len(titles)
    for i, title in enumerate(titles):
        draw.text((i * column + 4, 2), title, fill="black")
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def read_png_classes(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image))


def preview_ids(unlabeled, count=8):
    """The unlabelled images that pictures show: a seeded choice, the same in every round of a run."""
    return random.Random(0).sample(sorted(unlabeled), min(count, len(unlabeled)))


def save_mask_sheet(path, description, ids, columns):
    """A contact sheet, a row per image id. columns: (title, what) with what "image", "truth", a
    folder of <id>.png palette masks, or ("confidence", folder) for grey <id>.png maps."""
    rows = []
    for image_id in ids:
        image = read_image(description.images[image_id]).as_subclass(torch.Tensor)
        row = []
        for _, what in columns:
            if what == "image":
                panel = image
            elif what == "truth":
                truth = true_mask_dataset(description, [image_id], masks_optional=True).load(0)[1]
                panel = overlay(image, truth.as_subclass(torch.Tensor), description.palette)
            elif isinstance(what, tuple):
                panel = read_png_classes(os.path.join(what[1], f"{image_id}.png")).expand(3, -1, -1)
            else:
                panel = overlay(image, read_png_classes(os.path.join(what, f"{image_id}.png")), description.palette)
            row.append(thumbnail(panel))
        rows.append(row)
    if rows:
        save_sheet(path, rows, [title for title, _ in columns])


# ============================================================================= checkpoints

def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path):
    """A checkpoint of this project, loaded without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, a pickle with foreign objects, a truncated file...
        raise UserError(f"{path} is not a checkpoint of this project, or is damaged: it cannot be loaded "
                        "with weights_only=True (nothing in it was unpickled)") from None
    if not isinstance(checkpoint, dict) or not {"model", "args", "labeled", "unlabeled", "class_names"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this project (written by stage1_train.py or stage3_multitask.py)")
    return checkpoint


def model_from_checkpoint(checkpoint, path, use_teacher=True):
    """Rebuild the model a checkpoint was trained with (the mean teacher's weights where it has one)."""
    args = checkpoint["args"]
    model = build_model(args["backbone"], len(checkpoint["class_names"]), weights="none", aux_head=args.get("aux_head"))
    weights = checkpoint["teacher"] if use_teacher and "teacher" in checkpoint else checkpoint["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit a {args['backbone']} model with "
                        f"{len(checkpoint['class_names'])} classes; the checkpoint is damaged or from another version") from None
    return model


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ============================================================================= training: what stages 1 and 3 share

# Flags that define a run; on --resume they come from the checkpoint, and a different value is refused.
RECIPE_FLAGS = ["labeled", "protocol", "split_seed", "labeled_list", "unlabeled_list", "backbone", "weights",
                "crop_size", "scale_range", "image_scale", "iters", "epochs", "optimizer", "lr", "head_lr_mult",
                "weight_decay", "warmup", "seed"]


def add_training_args(parser, default_out, default_length):
    """The data, split, model and optimisation flags that stages 1 and 3 share."""
    data = parser.add_argument_group("data and split")
    data.add_argument("--data-root", default="data/VOCdevkit/VOC2012",
                      help="the VOC2012 or the Cityscapes folder, recognised by its layout (default: %(default)s)")
    data.add_argument("--labeled", type=int, help="number of labelled images, drawn by the protocol (e.g. 92, 1464)")
    data.add_argument("--protocol", choices=["classic", "blended"], default="classic",
                      help="VOC: classic draws the labelled images from VOC's train.txt (1,464), blended from all "
                           "10,582 training images; Cityscapes: both draw from the 2,975 (default: %(default)s)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the labelled draw (default: %(default)s)")
    data.add_argument("--labeled-list", help="file of labelled images: bare ids or the field's 'image mask' lines (splits/)")
    data.add_argument("--unlabeled-list", help="file of unlabelled images (default: every other training image)")
    data.add_argument("--image-scale", type=float, default=1.0,
                      help="resize every image by this factor, in training, pseudo-labelling and evaluation "
                           "(0.5 on Cityscapes: the authors' 1024x512) (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default="resnet101",
                       help="DeepLabv3 backbone at output stride 8; tiny_unet is the CPU demo's (default: %(default)s)")
    model.add_argument("--weights", choices=WEIGHTS, default="imagenet",
                       help="the backbone's starting point: torchvision's ImageNet weights (the field's protocol), "
                            "its COCO-trained DeepLabv3 (the paper's setting on VOC), or none (default: %(default)s)")
    model.add_argument("--no-pretrained", dest="weights", action="store_const", const="none", help="the same as --weights none")
    train = parser.add_argument_group("training")
    train.add_argument("--crop-size", type=int, nargs="+", default=[321], metavar="SIZE",
                       help="training crop: one number for a square, or HEIGHT WIDTH (default: 321)")
    train.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 1.5], metavar=("MIN", "MAX"),
                       help="random rescaling of the image before cropping, the authors' (default: 0.5 1.5)")
    train.add_argument("--iters", type=int, help=f"optimiser steps (default: {default_length})")
    train.add_argument("--epochs", type=float, help="passes over the training stream, instead of --iters")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                       help="sgd: momentum 0.9, the DeepLab recipe; adamw: for training from scratch (default: %(default)s)")
    train.add_argument("--lr", type=float, default=0.001, help="learning rate of the backbone (default: %(default)s)")
    train.add_argument("--head-lr-mult", type=float, default=10.0,
                       help="the new layers' (heads', ĝ's) learning rate is this times --lr (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    train.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the poly decay (default: 0)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation (default: 0)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels-last memory format (default: on with CUDA, off on the CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of compiling first)")
    run.add_argument("--workers", type=int, default=default_workers(),
                     help="data-loading processes (default: %(default)s, from this machine's cores)")
    run.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--eval-every", type=int, default=0, help="also evaluate on val every N steps (default: at the end only)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
    run.add_argument("--print-every", type=int, default=20, help="progress line every N steps (default: %(default)s)")


def check_training_args(args):
    check_finite_floats(args)
    if len(args.crop_size) not in (1, 2):
        raise UserError(f"--crop-size takes one number or two (HEIGHT WIDTH), not {len(args.crop_size)}")
    for flag in ["crop_size", "batch_size", "iters", "save_every", "print_every"]:
        value = getattr(args, flag, None)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    for flag in ["lr", "epochs", "image_scale"]:
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, not {getattr(args, flag)}")
    if args.workers < 0 or args.warmup < 0 or args.eval_every < 0 or args.weight_decay < 0 or args.head_lr_mult < 0:
        raise UserError("--workers, --warmup, --eval-every, --weight-decay and --head-lr-mult cannot be negative")
    if not 0 < args.scale_range[0] <= args.scale_range[1]:
        raise UserError(f"--scale-range {args.scale_range[0]} {args.scale_range[1]}: need 0 < MIN <= MAX")
    if args.labeled is not None and args.labeled < 1:
        raise UserError(f"--labeled {args.labeled}: needs at least 1 labelled image")


def crop_of(args):
    """--crop-size as (height, width)."""
    return tuple(args.crop_size * 2 if len(args.crop_size) == 1 else args.crop_size)


def train_scale_range(args):
    """--scale-range relative to the image as read, after --image-scale."""
    return [args.image_scale * s for s in args.scale_range]


def resume_args(parser, args, checkpoint, recipe_flags, argv=None, movable=("data_root",)):
    """The arguments of the run being resumed: its recipe, with this command's running flags.

    A recipe flag given again with another value is refused rather than silently ignored. The
    `movable` folders (the data, and in stage 3 the pseudo-masks, whose content is checked
    otherwise) may have moved: a given one is taken, else the checkpoint's."""
    parser.set_defaults(**{key: None for key in vars(args)})
    given = {key for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    saved = checkpoint["args"]
    for key in recipe_flags:
        if key in given and key not in movable and getattr(args, key) != saved.get(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the run being resumed "
                            f"({saved.get(key)}); drop the flag, or start a new run in another --out")
    merged = {**vars(args), **{key: saved.get(key) for key in recipe_flags if key not in movable or key not in given}}
    if "data_root" not in given:
        merged["data_root"] = saved["data_root"]
    return argparse.Namespace(**merged)


def make_optimizer(model, args):
    """Backbone at --lr, new layers at --lr x --head-lr-mult; linear warm-up, then poly decay (power 0.9)."""
    groups = [{"params": model.backbone_parameters(), "lr": args.lr},
              {"params": model.head_parameters(), "lr": args.lr * args.head_lr_mult}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    def factor(step):
        return min(1.0, (step + 1) / args.warmup if args.warmup else 1.0) * (1 - step / args.iters) ** 0.9
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_model(model, args, device):
    """The model as trained: on the device, channels-last where asked, wrapped for several
    processes (batch norm synchronised on GPUs, so it sees the whole batch as in one process)
    and compiled where asked. The unwrapped model keeps the weights (and the state_dict keys)."""
    speed_setup(model.to(device), device, args.channels_last)
    net = model
    if args.distributed:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=getattr(args, "w_con", 1) == 0)
    return torch.compile(net) if args.compile else net


def finish_running_args(args):
    """Running defaults that depend on the machine, and several processes where torchrun started them."""
    init_distributed_mode(args)
    device = pick_device(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    return device


class Progress:
    """Every --print-every steps: a line (step, losses averaged since the last line, learning rate,
    speed, time left and, on a GPU, the achieved TFLOP/s and share of its peak) and its record for
    history.jsonl. Losses stay on the device between lines: reading them back waits for the GPU."""

    def __init__(self, start_step, iters, flops_per_step=None, peak=None):
        self.iters, self.last_step, self.last_time = iters, start_step, time.time()
        self.flops_per_step, self.peak = flops_per_step, peak
        self.sums, self.count = {}, 0

    def add(self, losses):
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.count += 1

    def mean_losses(self):
        """The losses averaged since the last line, as floats (this waits for the GPU)."""
        return {name: (value / max(self.count, 1)).item() for name, value in self.sums.items()}

    def line(self, step, lr):
        now = time.time()
        losses = self.mean_losses()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time, self.sums, self.count = step, now, {}, 0
        eta = datetime.timedelta(seconds=round((self.iters - step) / max(speed, 1e-9)))
        terms = "  ".join(f"{name} {value:.4f}" for name, value in losses.items())
        text = f"step {step}/{self.iters}  {terms}  lr {lr:.2e}  {speed:.2f} it/s  eta {eta}"
        record = {"step": step, **losses, "lr": lr, "it_per_s": speed, "time": now}
        if self.flops_per_step:
            achieved = self.flops_per_step * speed
            text += f"  {achieved / 1e12:.0f} TFLOP/s"
            record["tflop_per_s"] = achieved / 1e12
            if self.peak:
                text += f" ({100 * achieved / self.peak:.0f}% of peak)"
                record["share_of_peak"] = achieved / self.peak
        return text, record


def check_finite(losses, step):
    for name, value in losses.items():
        if not math.isfinite(value):
            raise SystemExit(f"error: {name} became {value} by step {step}; lower --lr (the last checkpoint is kept)")


class History:
    """history.jsonl in the output folder: one JSON object a line, for every progress line and every
    val evaluation. A resumed run first drops what was written after its checkpoint's step."""

    def __init__(self, out, resume_step=None):
        self.path = os.path.join(out, "history.jsonl")
        if not is_main_process():
            self.path = None
        elif resume_step is None:
            write_text(self.path, "")
        elif os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            write_text(self.path, "".join(kept))

    def append(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
