"""The small shared part of the pipeline: VOC data and splits, the model, the mIoU metric, and
the few helpers every script needs (errors, devices, atomic files, checkpoints)."""
import argparse
import copy
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
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
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


# ----------------------------------------------------------------------------- errors and files

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


def prepare_out_dir(out, resume):
    """Create the output folder; refuse to start a new run over an earlier run's checkpoint."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    checkpoint = os.path.join(out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not resume:
        raise UserError(f"{checkpoint} exists: add --resume to continue that run, or choose another --out")
    if resume and not os.path.exists(checkpoint):
        raise UserError(f"--resume: no {checkpoint} to continue from")
    os.makedirs(out, exist_ok=True)
    return checkpoint


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
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# ----------------------------------------------------------------------------- VOC data and splits

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


def save_mask_png(path, mask):
    """Write class indices as a palette PNG (VOC colours), atomically."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette())
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def check_data_root(root):
    if not os.path.isdir(root):
        raise UserError(f"--data-root {root} is not a folder (expected the VOC2012 folder, see README)")
    for sub in ["JPEGImages", os.path.join("ImageSets", "Segmentation", "val.txt")]:
        if not os.path.exists(os.path.join(root, sub)):
            raise UserError(f"--data-root {root} has no {sub}: is it the VOC2012 folder? (see README)")


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


def read_id_list(path, flag="split file"):
    """Image ids of a split file: bare ids or 'JPEGImages/<id>.jpg SegmentationClass/<id>.png' lines."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} not found")
    with open(path) as f:
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"{flag} {path} lists no image")
    if len(set(ids)) != len(ids):
        raise UserError(f"{flag} {path} lists an image twice")
    return ids


def training_ids(root):
    """All training ids: train_aug.txt, else every SegmentationClassAug mask, else VOC's train.txt."""
    val = set(read_id_list(os.path.join(root, "ImageSets", "Segmentation", "val.txt")))
    aug_list = os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt")
    aug_dir = os.path.join(root, "SegmentationClassAug")
    if os.path.exists(aug_list):
        ids = read_id_list(aug_list)
    elif os.path.isdir(aug_dir):
        ids = sorted(os.path.splitext(name)[0] for name in os.listdir(aug_dir) if name.endswith(".png"))
    else:
        ids = read_id_list(os.path.join(root, "ImageSets", "Segmentation", "train.txt"))
    return [i for i in ids if i not in val]  # never train on a val image


def image_path(root, image_id):
    return os.path.join(root, "JPEGImages", f"{image_id}.jpg")


def train_mask_path(root, image_id):
    """The SBD-augmented mask where there is one, else VOC's own; None if the image has neither."""
    for folder in ["SegmentationClassAug", "SegmentationClass"]:
        path = os.path.join(root, folder, f"{image_id}.png")
        if os.path.exists(path):
            return path
    return None


def val_mask_path(root, image_id):
    return os.path.join(root, "SegmentationClass", f"{image_id}.png")


def make_split(root, labeled, protocol="classic", seed=0, labeled_list=None, unlabeled_list=None):
    """The labelled and unlabelled training ids (both sorted), as METHOD.md's protocols define them.

    classic: `labeled` ids drawn from VOC's train.txt; blended: drawn from all training ids.
    The unlabelled ids are every other training id, unless --unlabeled-list names them.
    """
    all_train = training_ids(root)
    val = set(read_id_list(os.path.join(root, "ImageSets", "Segmentation", "val.txt")))
    if labeled_list:
        labeled_ids = read_id_list(labeled_list, "--labeled-list")
        if labeled is not None and labeled != len(labeled_ids):
            raise UserError(f"--labeled {labeled} but --labeled-list {labeled_list} lists {len(labeled_ids)} images")
    else:
        if labeled is None:
            raise UserError("give --labeled N (the number of labelled images) or --labeled-list FILE")
        if protocol == "classic":
            pool = [i for i in read_id_list(os.path.join(root, "ImageSets", "Segmentation", "train.txt")) if i not in val]
        else:
            pool = all_train
        if not 1 <= labeled <= len(pool):
            raise UserError(f"--labeled {labeled}: the {protocol} protocol draws from {len(pool)} images; "
                            f"use a number from 1 to {len(pool)}")
        labeled_ids = random.Random(seed).sample(sorted(pool), labeled)
    labeled_set = set(labeled_ids)
    if unlabeled_list:
        unlabeled_ids = [i for i in read_id_list(unlabeled_list, "--unlabeled-list") if i not in labeled_set]
    else:
        unlabeled_ids = [i for i in all_train if i not in labeled_set]

    for flag, ids in [("--labeled-list", labeled_ids), ("--unlabeled-list", unlabeled_ids)]:
        in_val = [i for i in ids if i in val]
        if in_val:
            raise UserError(f"{flag}: {len(in_val)} ids are val images (first: {in_val[0]}); training on them would leak val")
    for image_id in labeled_ids + unlabeled_ids:
        if not os.path.exists(image_path(root, image_id)):
            raise UserError(f"split id {image_id} has no image {image_path(root, image_id)}")
    for image_id in labeled_ids:
        if train_mask_path(root, image_id) is None:
            raise UserError(f"labelled id {image_id} has no mask in SegmentationClassAug/ or SegmentationClass/")
    return sorted(labeled_ids), sorted(unlabeled_ids)


def split_of_run(args, checkpoint):
    """The split of a training run: drawn by the protocol, or read back from the run being resumed."""
    if checkpoint is not None:
        return checkpoint["labeled"], checkpoint["unlabeled"]
    return make_split(args.data_root, args.labeled, args.protocol, args.split_seed, args.labeled_list, args.unlabeled_list)


def read_image(path):
    """An RGB image as a uint8 tv_tensors.Image (C, H, W)."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def read_mask(path, num_classes, size):
    """Class indices of a palette or single-channel PNG (never via RGB), checked against the image."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise UserError(f"mask {path} is a {image.mode} image; masks must be palette or single-channel PNGs of class indices")
            array = np.array(image)
    except OSError as e:
        raise UserError(f"cannot read mask {path}: {e}") from None
    if array.shape != tuple(size):
        raise UserError(f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is {size[1]}x{size[0]}")
    bad = (array >= num_classes) & (array != IGNORE)
    if bad.any():
        raise UserError(f"mask {path} has label {int(array[bad][0])}, neither a class (0-{num_classes - 1}) nor {IGNORE}")
    return tv_tensors.Mask(torch.from_numpy(array))


def normalize(image):
    """uint8 image to the float input the ImageNet-pretrained backbones expect."""
    return v2.functional.normalize(v2.functional.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def weak_augment(crop_size, scale_range):
    """Random scale (relative to the image), crop with padding (255 in masks), horizontal flip.

    Returns a function of (image, *masks) that transforms them all with the same parameters.
    """
    crop_and_flip = v2.Compose([
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(),
    ])

    def transform(image, *masks):
        scale = random.uniform(*scale_range)
        size = [max(1, round(side * scale)) for side in image.shape[-2:]]
        image, *masks = [v2.functional.resize(x, size, antialias=True) for x in (image, *masks)]  # masks: nearest
        return crop_and_flip(image, *masks)
    return transform


def strong_augment():
    """RandAugment-style photometric operations (two drawn at random) and Cutout: nothing geometric,
    so the teacher's target and the pseudo-mask stay aligned with the student's view."""
    operations = [
        v2.ColorJitter(brightness=0.5), v2.ColorJitter(contrast=0.5), v2.ColorJitter(saturation=0.5),
        v2.ColorJitter(hue=0.25), v2.RandomPosterize(bits=4, p=1), v2.RandomSolarize(threshold=128, p=1),
        v2.RandomAutocontrast(p=1), v2.RandomEqualize(p=1), v2.RandomAdjustSharpness(sharpness_factor=2, p=1),
        v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0)), v2.Grayscale(num_output_channels=3),
    ]
    return v2.Compose([v2.RandomChoice(operations), v2.RandomChoice(operations),
                       v2.RandomErasing(p=1, scale=(0.02, 0.25), value=0)])  # Cutout


def labeled_augment(crop_size, scale_range, strong):
    """The labelled images' augmentation: weak, and with --strong-aug also the photometric strong one."""
    weak = weak_augment(crop_size, scale_range)
    if not strong:
        return weak
    photometric = strong_augment()

    def transform(image, mask):
        image, mask = weak(image, mask)
        return photometric(image), mask
    return transform


class SegmentationDataset(torch.utils.data.Dataset):
    """Images of a list of ids with one mask each, through an optional joint transform.

    mask_path(id) gives the mask file; a None path reads as an all-ignore mask when
    masks_optional, and is an error otherwise. Items: (normalized image, int64 mask, index).
    """

    def __init__(self, root, ids, num_classes, mask_path, transform=None, masks_optional=False):
        self.root, self.ids, self.num_classes = root, ids, num_classes
        self.mask_path, self.transform, self.masks_optional = mask_path, transform, masks_optional

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        image_id = self.ids[index]
        image = read_image(image_path(self.root, image_id))
        path = self.mask_path(image_id)
        if path is None or not os.path.exists(path):
            if not self.masks_optional:
                raise UserError(f"image {image_id} has no mask {path or ''}".rstrip())
            return image, tv_tensors.Mask(torch.full(image.shape[-2:], IGNORE, dtype=torch.uint8))
        return image, read_mask(path, self.num_classes, image.shape[-2:])

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return normalize(image), mask.long(), index


def same_size_batches(root, ids, batch_size):
    """Batches of indices whose images share one size, so full images batch without padding
    (padding would change the result: ASPP's image pooling averages over the padded area)."""
    by_size = {}
    for index, image_id in enumerate(ids):
        try:
            with Image.open(image_path(root, image_id)) as image:  # reads the header only
                by_size.setdefault(image.size, []).append(index)
        except OSError as e:
            raise UserError(f"cannot read image {image_path(root, image_id)}: {e}") from None
    return [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def full_image_loader(dataset, batch_size, workers):
    """Whole images, unaugmented, in same-size batches."""
    batches = same_size_batches(dataset.root, dataset.ids, batch_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


def val_dataset(root, num_classes):
    ids = read_id_list(os.path.join(root, "ImageSets", "Segmentation", "val.txt"))
    for image_id in ids:
        if not os.path.exists(image_path(root, image_id)):
            raise UserError(f"val id {image_id} has no image {image_path(root, image_id)}")
    return SegmentationDataset(root, ids, num_classes, lambda i: val_mask_path(root, i))


def infinite(loader):
    """Batches forever, reshuffled each pass: training counts optimiser steps, not epochs."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------- the model

class TinyUNet(nn.Module):
    """The CPU demo's backbone, learnable from scratch in minutes (../shared/DEMO-NOTES.md):
    4 levels of 16/32/64/128 channels, nearest upsampling with skip connections.

    forward returns (features at 1/2 resolution, full-resolution skip): the input of the last
    stage, TinyUNetLastStage, which the 'separate' auxiliary head copies.
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
    def __init__(self, in_channels=32, skip_channels=16):
        super().__init__()
        self.block = double_conv(in_channels + skip_channels, skip_channels)

    def forward(self, features):
        x, skip = features
        return self.block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))


def double_conv(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class SegmentationModel(nn.Module):
    """A backbone split before its last stage, the main head g and an optional auxiliary head.

    aux_head='separate': ĝ of paper stage 2, its own copy of the last stage fed by the stage before.
    aux_head='shared':   g̃ of paper stage 3, a second head on the shared last-stage features.
    """

    def __init__(self, lower, last_stage, make_head, aux_head=None):
        super().__init__()
        self.lower, self.last_stage, self.head = lower, last_stage, make_head()
        self.aux_last_stage = copy.deepcopy(last_stage) if aux_head == "separate" else None
        self.aux_head = make_head() if aux_head else None

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

    def backbone_parameters(self):
        """The pretrained part (lower stages, last stage and its copy); the heads are new layers."""
        return [p for name, p in self.named_parameters() if not name.startswith(("head.", "aux_head."))]

    def head_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith(("head.", "aux_head."))]


def build_model(backbone, num_classes, pretrained=True, aux_head=None):
    """DeepLabv3 (torchvision's backbones at output stride 8, its ASPP head) or the demo's TinyUNet."""
    if backbone in ("resnet50", "resnet101"):
        weights = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1 if pretrained else None
        net = download_guard(lambda: torchvision.models.get_model(
            backbone, weights=weights, replace_stride_with_dilation=[False, True, True]))
        lower = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        model = SegmentationModel(lower, net.layer4, lambda: DeepLabHead(2048, num_classes), aux_head)
    elif backbone == "mobilenet_v3_large":
        weights = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1 if pretrained else None
        features = download_guard(lambda: torchvision.models.mobilenet_v3_large(weights=weights, dilated=True)).features
        # As torchvision's deeplabv3_mobilenet_v3_large: the last stage starts at the last strided block.
        last_start = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)][-1]
        model = SegmentationModel(features[:last_start], features[last_start:],
                                  lambda: DeepLabHead(features[-1].out_channels, num_classes), aux_head)
        # torchvision's MobileNet BN momentum is 0.01: from scratch, eval-mode statistics lag far behind.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    elif backbone == "tiny_unet":
        if pretrained:
            raise UserError("--backbone tiny_unet has no pretrained weights: add --no-pretrained")
        model = SegmentationModel(TinyUNet(), TinyUNetLastStage(), lambda: nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, num_classes, 1)), aux_head)
    else:
        raise UserError(f"--backbone {backbone}: choose one of {', '.join(BACKBONES)}")
    return model


def download_guard(build):
    """Build a torchvision model; a failed weights download becomes one line that says what to do."""
    try:
        return build()
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise UserError(f"cannot download the ImageNet weights ({e}); put the file in {cache} "
                        "or add --no-pretrained to train from scratch") from None


# ----------------------------------------------------------------------------- the metric

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


@torch.no_grad()
def predict_probs(model, images, scales=(1.0,), flip=False, amp=False, head=0):
    """Class probabilities of full images, averaged over the scales (and horizontal flips) asked for.
    head 1: the auxiliary head's."""
    size = images.shape[-2:]
    probs = 0
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = scaled.flip(-1) if flipped else scaled
            with autocast(images.device, amp):
                logits = model(x, with_aux=True)[1] if head == 1 else model(x)
            logits = logits.flip(-1) if flipped else logits
            probs = probs + F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
    return probs / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate(model, loader, device, num_classes, amp=False, head=0):
    """Confusion matrix of full-image, single-scale predictions on a loader (head 1: the auxiliary head)."""
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for images, masks, _ in loader:
        probs = predict_probs(model, images.to(device, non_blocking=True), amp=amp, head=head)
        confusion.update(masks.to(device), probs.argmax(1))
    return confusion


# ----------------------------------------------------------------------------- checkpoints

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
    model = build_model(args["backbone"], len(checkpoint["class_names"]), pretrained=False, aux_head=args.get("aux_head"))
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


# ----------------------------------------------------------------------------- what stages 1 and 3 share

# Flags that define a run; on --resume they come from the checkpoint, and a different value is refused.
RECIPE_FLAGS = ["labeled", "protocol", "split_seed", "labeled_list", "unlabeled_list", "backbone", "no_pretrained",
                "crop_size", "scale_range", "strong_aug", "iters", "epochs", "optimizer", "lr", "head_lr_mult",
                "weight_decay", "warmup", "seed"]


def add_training_args(parser, default_out):
    """The data, split, model and optimisation flags of stage 1, which stage 3 shares."""
    data = parser.add_argument_group("data and split")
    data.add_argument("--data-root", default="data/VOCdevkit/VOC2012", help="the VOC2012 folder (default: %(default)s)")
    data.add_argument("--labeled", type=int, help="number of labelled images, drawn by the protocol (e.g. 92, 1464)")
    data.add_argument("--protocol", choices=["classic", "blended"], default="classic",
                      help="classic: draw the labelled images from VOC's train.txt (1,464); "
                           "blended: from all training images (10,582) (default: %(default)s)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the labelled draw (default: %(default)s)")
    data.add_argument("--labeled-list", help="file of labelled ids (bare ids or 'JPEGImages/x.jpg SegmentationClass/x.png')")
    data.add_argument("--unlabeled-list", help="file of unlabelled ids (default: every other training image)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default="resnet101",
                       help="DeepLabv3 backbone at output stride 8; tiny_unet is the CPU demo's (default: %(default)s)")
    model.add_argument("--no-pretrained", action="store_true", help="random initialisation instead of ImageNet weights")
    train = parser.add_argument_group("training")
    train.add_argument("--crop-size", type=int, default=321, help="square training crop (default: %(default)s)")
    train.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                       help="random rescaling of the image before cropping (default: 0.5 2.0)")
    train.add_argument("--strong-aug", action="store_true",
                       help="also give the labelled images the strong photometric augmentation (RandAugment-style "
                            "operations and Cutout); off in the paper, on in the CPU demo, where it curbs overfitting")
    train.add_argument("--iters", type=int, help="optimiser steps (default: from --epochs)")
    train.add_argument("--epochs", type=float, default=80,
                       help="passes over the labelled images, when --iters is not given (default: %(default)s)")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                       help="sgd: momentum 0.9, the DeepLab recipe; adamw: for training from scratch (default: %(default)s)")
    train.add_argument("--lr", type=float, default=0.001, help="learning rate of the backbone (default: %(default)s)")
    train.add_argument("--head-lr-mult", type=float, default=10.0,
                       help="the heads' learning rate is this times --lr (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    train.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the poly decay (default: 0)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    run.add_argument("--workers", type=int, default=4, help="data-loading processes (default: %(default)s)")
    run.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--eval-every", type=int, default=0, help="also evaluate on val every N steps (default: at the end only)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
    run.add_argument("--print-every", type=int, default=20, help="progress line every N steps (default: %(default)s)")


def check_training_args(args):
    for flag in ["crop_size", "batch_size", "iters", "save_every", "print_every"]:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    for flag in ["lr", "epochs"]:
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive, not {getattr(args, flag)}")
    if args.workers < 0 or args.warmup < 0 or args.eval_every < 0:
        raise UserError("--workers, --warmup and --eval-every cannot be negative")
    if not 0 < args.scale_range[0] <= args.scale_range[1]:
        raise UserError(f"--scale-range {args.scale_range[0]} {args.scale_range[1]}: need 0 < MIN <= MAX")
    if args.labeled is not None and args.labeled < 1:
        raise UserError(f"--labeled {args.labeled}: needs at least 1 labelled image")


def resume_args(parser, args, checkpoint, recipe_flags, argv=None):
    """The arguments of the run being resumed: its recipe, with this command's running flags.

    A recipe flag given again with another value is refused rather than silently ignored."""
    parser.set_defaults(**{key: None for key in vars(args)})
    given = {key for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    saved = checkpoint["args"]
    for key in recipe_flags:
        if key in given and getattr(args, key) != saved.get(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the run being resumed "
                            f"({saved.get(key)}); drop the flag, or start a new run in another --out")
    merged = {**vars(args), **{key: saved.get(key) for key in recipe_flags}}
    if "data_root" not in given:  # the data may have moved: a given --data-root is taken
        merged["data_root"] = saved["data_root"]
    return argparse.Namespace(**merged)


def make_optimizer(model, args):
    """Backbone at --lr, heads at --lr x --head-lr-mult; linear warm-up, then poly decay (power 0.9)."""
    groups = [{"params": model.backbone_parameters(), "lr": args.lr},
              {"params": model.head_parameters(), "lr": args.lr * args.head_lr_mult}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    def factor(step):
        return min(1.0, (step + 1) / args.warmup if args.warmup else 1.0) * (1 - step / args.iters) ** 0.9
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loader(dataset, batch_size, workers):
    """Shuffled batches of a fixed size, even from fewer images than one batch."""
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=max(len(dataset), batch_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available())


class Progress:
    """One line every few steps: the step, the losses, the learning rate, speed and time left."""

    def __init__(self, start_step, iters):
        self.iters, self.last_step, self.last_time = iters, start_step, time.time()

    def line(self, step, losses, lr):
        now = time.time()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = datetime.timedelta(seconds=round((self.iters - step) / max(speed, 1e-9)))
        terms = "  ".join(f"{name} {value:.4f}" for name, value in losses.items())
        return f"step {step}/{self.iters}  {terms}  lr {lr:.2e}  {speed:.2f} it/s  eta {eta}"
