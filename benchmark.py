"""Speed and memory of every stage in a steady state, the whole pipeline projected from them, and,
with --scripts, the real scripts end to end on a written VOC-sized tree to check the projection.

    python benchmark.py                         on a GPU: every case, VOC's and Cityscapes' shapes, bf16 and fp32
    python benchmark.py --compile               also the torch.compile'd training steps (minutes of compiling)
    python benchmark.py --scripts --amp         the four scripts end to end on a written VOC-sized tree
    python benchmark.py --profile "multi-task, ĝ" --datasets voc --trace step.json    where a step's time goes
    python benchmark.py --device cpu --backbone tiny_unet --shrink 8 --steps 2 --repeats 2    a quick run on the CPU

The cases: stage 1's step at batch 16, the multi-task step at 1 + 9 with ĝ and with g̃, and the
forward of pseudo-labelling and evaluation on whole 500x375 images at batch 8 (Cityscapes: batch
4, 1 + 4, 256x512 crops, 2048x1024 images at half scale), each the scripts' own function on
random data. Steady state: a case warms up in blocks of --steps steps, at least --min-warmup steps
(50 for compiled code) and then until a block is no longer faster than the one before (at most
--max-warmup), then --repeats blocks are timed; a figure is their median, with the slowest and fastest. Reported:
steps/s, images/s, peak memory (torch.cuda.max_memory_allocated after the warm-up), the FLOPs of
a step as torch's FlopCounterMode counts them, TFLOP/s and, on a known GPU, the share of its peak.
The data loaders (decoding and augmentation with --workers processes) are timed on images written
at the datasets' sizes (or on --data-root), and the pipeline at its default lengths is projected.

--scripts writes a VOC-sized tree (--train-images at 500x375 and 375x500, a tenth as many val
images) and runs stage1_train.py, stage2_pseudolabel.py, stage3_multitask.py (ĝ) and evaluate.py
on it as a user does (--script-steps each), then sets each script's own steady rate (its
history.jsonl after the first lines; stage 2's images/s from its start to its last file) beside
the step benchmark's figure for the same shapes. Everything is written to --json.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
import outputs
import stage1_train
import stage3_multitask
import training

# The scripts' default recipes: the shapes of each step and the lengths of each stage.
DATASETS = {
    "voc": dict(classes=21, batch=16, crop=(321, 321), labeled=1, unlabeled=9, image=(375, 500), image_scale=1.0,
                stage1_iters=stage1_train.IMAGES_SEEN // 16, multitask_iters=stage3_multitask.DEFAULT_ITERS,
                train_images=10582, val_images=1449),
    "cityscapes": dict(classes=19, batch=4, crop=(256, 512), labeled=1, unlabeled=4, image=(1024, 2048),
                       image_scale=0.5, stage1_iters=20_000, multitask_iters=stage3_multitask.DEFAULT_ITERS,
                       train_images=2975, val_images=500),
}
INFERENCE_BATCH = 8  # stage2_pseudolabel.py's and evaluate.py's default
# Dense peak TFLOP/s by the vendors' datasheets: (bf16, tf32). fp32 convolutions run as TF32 on these
# cards by PyTorch's default, so that is the peak an fp32 run is measured against.
GPU_PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "A100": (312, 156),
                   "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35), "RTX 4090": (165, 83)}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--backbone", choices=common.BACKBONES, default="resnet101", help="(default: %(default)s)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS), help="(default: both)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="(default: all)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps in bf16")
    parser.add_argument("--steps", type=int, default=10, help="steps in a block (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks, after the warm-up (default: %(default)s)")
    parser.add_argument("--min-warmup", type=int, default=20,
                        help="the fewest warm-up steps (default: %(default)s; 50 compiled)")
    parser.add_argument("--max-warmup", type=int, default=300, help="the most warm-up steps (default: %(default)s)")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every image side and batch by this, for a quick run on the CPU (default: 1)")
    parser.add_argument("--loader-images", type=int, default=48,
                        help="images written at each dataset's size to time the data loaders; 0 skips them "
                             "(default: %(default)s)")
    parser.add_argument("--data-root", help="time the loaders on this dataset instead of written images")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes, as the scripts' default (default: %(default)s)")
    parser.add_argument("--scripts", action="store_true", help="run the four scripts end to end instead (see above)")
    parser.add_argument("--amp", action="store_true", help="with --scripts: bf16, as the scripts' --amp")
    parser.add_argument("--train-images", type=int, default=2000, help="with --scripts (default: %(default)s)")
    parser.add_argument("--script-steps", type=int, default=300,
                        help="with --scripts: steps of stages 1 and 3 (default: %(default)s)")
    parser.add_argument("--profile", choices=list(CASES), metavar="CASE",
                        help="instead: profile one case (of --cases' names) on the first of --datasets after its "
                             "warm-up, --steps steps under torch.profiler: the top operators and kernels, the device's "
                             "idle gaps")
    parser.add_argument("--trace", help="with --profile: also write the Chrome trace here (chrome://tracing, Perfetto)")
    parser.add_argument("--json", default="benchmark.json", help="write every figure here (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.shrink, args.train_images, args.script_steps) < 1 or min(
            args.min_warmup, args.max_warmup, args.loader_images, args.workers) < 0:
        raise common.UserError("--steps, --repeats, --shrink, --train-images and --script-steps must be at least 1, "
                               "--min-warmup, --max-warmup, --loader-images and --workers at least 0")
    if args.trace and not args.profile:
        raise common.UserError("--trace goes with --profile CASE")
    return args


def shrunk(shape, args):
    """A dataset's shapes divided by --shrink (sides at least 16 pixels, batches at least 1; 2 for a DeepLab batch)."""
    smallest = 1 if args.backbone == "tiny_unet" else 2
    return {**shape, "batch": max(smallest, shape["batch"] // args.shrink),
            "labeled": max(1, shape["labeled"] // args.shrink), "unlabeled": max(1, shape["unlabeled"] // args.shrink),
            "crop": tuple(max(16, x // args.shrink) for x in shape["crop"]),
            "image": tuple(max(16, x // args.shrink) for x in shape["image"])}


def recipe(args, shape, precision, channels_last, compile, aux_head=None):
    """The flags a script would have for this case."""
    return argparse.Namespace(
        backbone=args.backbone, aux_head=aux_head, optimizer="sgd", lr=1e-3, head_lr_mult=10.0, weight_decay=1e-4,
        warmup=0, iters=10**9, w_sup=1.0, w_con=0.5, ema_decay=None, amp=precision == "bf16",
        channels_last=channels_last, compile=compile, distributed=False)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, args, device, compiled=False):
    """Seconds a step in the steady state: warm-up blocks of --steps steps, at least --min-warmup
    steps (50 for compiled code, whose first steps compile and tune) and then until a block is no
    more than 5% faster than the one before (at most --max-warmup steps); then --repeats timed
    blocks. Returns (median, slowest, fastest, warm-up steps)."""
    def block():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / args.steps
    least = min(args.max_warmup, max(args.min_warmup, 50 if compiled else 0))
    previous, warmup = block(), args.steps
    while warmup < args.max_warmup:
        current = block()
        warmup += args.steps
        if warmup >= least and current >= 0.95 * previous:  # no longer getting faster
            break
        previous = current
    if device.type == "cuda":  # the steady state's peak, not cuDNN's workspace trials in the first steps
        torch.cuda.reset_peak_memory_stats(device)
    times = sorted(block() for _ in range(args.repeats))
    return statistics.median(times), times[-1], times[0], warmup


def count_flops(fn):
    """FLOPs of fn() as torch's FlopCounterMode counts them (convolutions and matrix products, 2 per
    multiply-add), run on meta tensors: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device, amp):
    """The card's dense peak in FLOP/s for this precision, or None for a card not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((1e12 * (bf16 if amp else tf32) for key, (bf16, tf32) in GPU_PEAK_TFLOPS.items() if key in name), None)


def random_batch(n, crop, classes, device, channels_last):
    images = torch.randn(n, 3, *crop, device=device)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    return images, torch.randint(0, classes, (n, *crop), device=device)


def stage1_case(args, shape, device, flags):
    model = common.build_model(args.backbone, shape["classes"], weights="none")
    optimizer, scheduler = training.make_optimizer(model, flags)
    net = training.prepare_model(model, flags, device)
    images, masks = random_batch(shape["batch"], shape["crop"], shape["classes"], device, flags.channels_last)

    def flops():
        model = common.build_model(args.backbone, shape["classes"], weights="none")
        masks = torch.zeros(shape["batch"], *shape["crop"], dtype=torch.long)
        F.cross_entropy(model(torch.zeros(shape["batch"], 3, *shape["crop"])), masks).backward()

    def step():
        return stage1_train.train_one_step(net, images, masks, optimizer, scheduler, flags.amp)
    return step, shape["batch"], flops


def multitask_case(args, shape, device, flags):
    student = common.build_model(args.backbone, shape["classes"], weights="none", aux_head=flags.aux_head)
    optimizer, scheduler = training.make_optimizer(student, flags)
    student = training.prepare_model(student, flags, device)
    teacher, update_teacher = stage3_multitask.make_teacher(training.unwrapped(student))
    teacher = torch.compile(teacher) if flags.compile else teacher
    n_l, n_u, crop = shape["labeled"], shape["unlabeled"], shape["crop"]

    def batches(device, make=random_batch):
        x_l, y_l = make(n_l, crop, shape["classes"], device, flags.channels_last)
        x_weak, p = make(n_u, crop, shape["classes"], device, flags.channels_last)
        x_strong, _ = make(n_u, crop, shape["classes"], device, flags.channels_last)
        source = torch.arange(crop[0] * crop[1], device=device).view(crop).repeat(n_u, 1, 1)
        return (x_l, y_l, y_l.clone()), (x_weak, x_strong, p, source)
    labeled, unlabeled = batches(device)

    def flops():
        model = common.build_model(args.backbone, shape["classes"], weights="none", aux_head=flags.aux_head)
        frozen = common.build_model(args.backbone, shape["classes"], weights="none", aux_head=flags.aux_head).eval()
        meta_labeled, meta_unlabeled = batches(None, lambda n, c, k, d, cl: (torch.zeros(n, 3, *c),
                                                                             torch.zeros(n, *c, dtype=torch.long)))
        stage3_multitask.losses(model, frozen, meta_labeled, meta_unlabeled, 1.0, 0.5, False)["L"].backward()
    step = lambda: stage3_multitask.train_one_step(student, teacher, update_teacher, labeled, unlabeled,  # noqa: E731
                                                   optimizer, scheduler, flags)
    return step, n_l + n_u, flops


def inference_case(args, shape, device, flags):
    """The forward of stage2_pseudolabel.py and evaluate.py: whole images at the training scale."""
    model = common.build_model(args.backbone, shape["classes"], weights="none").to(device).eval()
    model.to(memory_format=torch.channels_last if flags.channels_last else torch.contiguous_format)
    n = max(1, INFERENCE_BATCH // args.shrink)
    images = torch.randn(n, 3, *shape["image"], device=device)
    images = images.contiguous(memory_format=torch.channels_last) if flags.channels_last else images

    def flops():
        common.image_probs(common.build_model(args.backbone, shape["classes"], weights="none").eval(),
                           torch.zeros(n, 3, *shape["image"]), shape["image_scale"])
    return lambda: common.image_probs(model, images, shape["image_scale"], flags.amp), n, flops


CASES = {"stage 1": (stage1_case, None), "multi-task, ĝ": (multitask_case, "separate"),
         "multi-task, g̃": (multitask_case, "shared"), "pseudo-labels / eval": (inference_case, None)}


def plan(args, device):
    """(dataset, case, precision, channels-last, compile) of every case to time. Channels-last
    and fp32 are compared where they matter most; the rest run in the likely fastest setting."""
    precisions = ["bf16", "fp32"] if device.type == "cuda" else ["fp32"]
    on_gpu = device.type == "cuda"
    cases = []
    for dataset in args.datasets:
        first = dataset == args.datasets[0]
        for case in args.cases:
            for precision in precisions:
                if precision != precisions[0] and case == "multi-task, g̃":
                    continue
                cases.append((dataset, case, precision, on_gpu, False))
                if on_gpu and first and precision == precisions[0] and case != "multi-task, g̃":
                    cases.append((dataset, case, precision, False, False))
            if args.compile and first and case != "pseudo-labels / eval":
                cases.append((dataset, case, precisions[0], on_gpu, True))
    return cases


def build_case(args, device, dataset, case, precision, channels_last, compile):
    """A case at the dataset's (shrunk) shapes: (its step, images a step, its FLOP function, its flags)."""
    shape = shrunk(DATASETS[dataset], args)
    build, aux_head = CASES[case]
    flags = recipe(args, shape, precision, channels_last, compile, aux_head)
    return (*build(args, shape, device, flags), flags)


def time_case(args, device, dataset, case, precision, channels_last, compile, flop_counts):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, images_per_step, flops, flags = build_case(args, device, dataset, case, precision, channels_last, compile)
    if (dataset, case) not in flop_counts:  # the same for every precision and layout
        flop_counts[dataset, case] = count_flops(flops)
    flop = flop_counts[dataset, case]
    seconds, slowest, fastest, warmup = time_steps(step, args, device, compile)
    peak = peak_flops(device, flags.amp)
    return {"dataset": dataset, "case": case, "precision": precision, "channels_last": channels_last,
            "compile": compile, "images_per_step": images_per_step, "steps_per_s": 1 / seconds,
            "steps_per_s_range": [1 / slowest, 1 / fastest], "warmup_steps": warmup,
            "images_per_s": images_per_step / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "tflop_per_step": flop / 1e12, "tflop_per_s": flop / seconds / 1e12,
            "share_of_peak": flop / seconds / peak if peak else None}


# ----------------------------------------------------------------------------- the data loaders

def write_images(root, dataset, count, size, val=0):
    """`count` training and `val` val images (smooth, so they compress like photographs) with masks,
    in the dataset's layout, at `size` (and, for VOC, every third one turned: 375x500 and 500x375)."""
    rng = np.random.default_rng(0)
    ids = [f"img_{i:05d}" for i in range(count + val)]
    for index, image_id in enumerate(ids):
        height, width = size if dataset != "voc" or index % 3 else size[::-1]
        yy, xx = np.mgrid[0:height, 0:width]
        a, b, c = rng.uniform(0.002, 0.02, size=3)
        waves = [np.sin(a * xx + b * yy), np.sin(b * xx - c * yy), np.sin(c * xx + a * yy)]
        image = (127 + 120 * np.stack(waves, -1)).astype(np.uint8)
        mask = ((xx * a * 10 + yy * b * 10).astype(int) % 5).astype(np.uint8)
        if dataset == "voc":
            for folder in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"]:
                os.makedirs(os.path.join(root, folder), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90)
            Image.fromarray(mask, mode="L").save(os.path.join(root, "SegmentationClass", f"{image_id}.png"))
        else:
            split = "train" if index < count else "val"
            for folder in ["leftImg8bit", "gtFine"]:
                for s in ["train", "val"]:
                    os.makedirs(os.path.join(root, folder, s, "city"), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, "leftImg8bit", split, "city",
                                                     f"{image_id}_leftImg8bit.png"))
            Image.fromarray(mask + 7, mode="L").save(os.path.join(root, "gtFine", split, "city",
                                                                  f"{image_id}_gtFine_labelIds.png"))
    if dataset == "voc":
        for name, listed in [("train", ids[:count]), ("val", ids[count:])]:
            outputs.write_text(os.path.join(root, "ImageSets", "Segmentation", f"{name}.txt"),
                               "".join(f"{i}\n" for i in listed))
    return root


def images_per_second(batches, workers, seconds=3.0):
    """Images/s of a loader in its steady state: the batches the workers prefetched while
    starting are drained first, then batches are timed for a few seconds."""
    for _ in range(1 + 4 * workers):
        next(batches)
    start, seen = time.perf_counter(), 0
    for images, *_ in batches:  # a finite loader may end sooner
        seen += len(images)
        if time.perf_counter() - start >= seconds:
            break
    return seen / (time.perf_counter() - start)


def time_loaders(args, dataset, root):
    """Images/s of each stream: stage 1's labelled images, the multi-task stream (weak view and S),
    and the whole images of pseudo-labelling and evaluation."""
    shape = DATASETS[dataset]
    description = common.describe_dataset(root)
    ids = description.train_ids
    crop = list(shape["crop"])
    scale_range = [shape["image_scale"] * s for s in ([0.5, 1.5] if dataset == "voc" else [1.0, 1.0])]
    labeled = common.SegmentationDataset(description, ids, stage1_train.augment(crop, scale_range, False))
    strong = stage3_multitask.StrongViewDataset(common.SegmentationDataset(description, ids),
                                                training.weak_augment(crop, scale_range))
    full = common.SegmentationDataset(description, ids * max(1, 2000 // len(ids)), masks_optional=True)  # to time
    return {
        "stage 1": images_per_second(training.train_loader(labeled, shape["batch"], args.workers, 0), args.workers),
        "multi-task (weak + S)": images_per_second(
            training.train_loader(strong, shape["unlabeled"], args.workers, 0), args.workers),
        "pseudo-labels / eval": images_per_second(iter(common.full_image_loader(full, INFERENCE_BATCH, args.workers)),
                                                  args.workers),
    }


# ----------------------------------------------------------------------------- the projection

def project(results, loaders, dataset):
    """Hours for the whole pipeline at its default lengths, from the fastest measured setting of
    each case; a step takes as long as the slower of the GPU and its data loader."""
    shape = DATASETS[dataset]
    best = {}
    for r in results:
        if r["dataset"] == dataset and r["images_per_s"] > best.get(r["case"], {"images_per_s": 0})["images_per_s"]:
            best[r["case"]] = r
    if len(best) < len(CASES):
        return None
    loader = loaders.get(dataset, {})

    def seconds(case, count, loader_name):
        return count / min(best[case]["images_per_s"], loader.get(loader_name, math.inf))
    multitask = shape["multitask_iters"] * (shape["labeled"] + shape["unlabeled"])
    parts = {
        "stage 1": seconds("stage 1", shape["stage1_iters"] * shape["batch"], "stage 1"),
        "multi-task, ĝ": seconds("multi-task, ĝ", multitask, "multi-task (weak + S)"),
        "multi-task, g̃": seconds("multi-task, g̃", multitask, "multi-task (weak + S)"),
        # three rounds of pseudo-masks; val once after stage 1, twice (both heads) after each multi-task stage,
        # once by evaluate.py
        "pseudo-labels and evaluation": seconds("pseudo-labels / eval",
                                                3 * shape["train_images"] + 6 * shape["val_images"],
                                                "pseudo-labels / eval"),
    }
    return {"hours": {k: v / 3600 for k, v in parts.items()}, "total_hours": sum(parts.values()) / 3600,
            "settings": {k: {key: r[key] for key in ["precision", "channels_last", "compile"]}
                         for k, r in best.items()}}


# ----------------------------------------------------------------------------- the scripts end to end

def run_scripts(args, device, results):
    """The four scripts as a user runs them on a written VOC-sized tree; each script's own steady
    rate beside the step benchmark's figure for the same shapes."""
    shape = shrunk(DATASETS["voc"], args)
    rates = {r["case"]: r for r in results}
    report = []
    with tempfile.TemporaryDirectory() as folder:
        root = write_images(os.path.join(folder, "VOC2012"), "voc", args.train_images, shape["image"],
                            max(1, args.train_images // 10))
        amp = ["--amp"] if args.amp else []
        common_flags = ["--backbone", args.backbone, "--weights", "none", "--workers", args.workers, "--device",
                        device.type, "--crop-size", shape["crop"][0], "--print-every", 20, "--save-every", 10**6, *amp]
        commands = [
            ("stage 1", ["stage1_train.py", "--data-root", root, "--labeled", min(args.train_images, 1464),
                         "--batch-size", shape["batch"], "--iters", args.script_steps, *common_flags,
                         "--out", f"{folder}/s1"]),
            ("pseudo-labels / eval", ["stage2_pseudolabel.py", "--checkpoint", f"{folder}/s1", "--out", f"{folder}/p1",
                                      "--workers", args.workers, "--device", device.type, *amp]),
            ("multi-task, ĝ", ["stage3_multitask.py", "--pseudo", f"{folder}/p1", "--batch-labeled", shape["labeled"],
                               "--batch-unlabeled", shape["unlabeled"], "--iters", args.script_steps, *common_flags,
                               "--out", f"{folder}/s2"]),
            ("evaluate", ["evaluate.py", "--checkpoint", f"{folder}/s2", "--workers", args.workers, "--device",
                          device.type, *amp]),
        ]
        for case, command in commands:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), command[0]),
                                   *map(str, command[1:])], capture_output=True, text=True)
            if done.returncode:
                raise common.UserError(f"{command[0]} failed: {done.stderr.strip().splitlines()[-1]}")
            wall = time.perf_counter() - start
            out = command[command.index("--out") + 1] if "--out" in command else None
            if case == "pseudo-labels / eval":
                stats = json.load(open(os.path.join(out, "stats.json")))
                rate, unit, length = stats["images_per_second"], "images/s", stats["images_labelled_now"]
                benchmark = rates[case]["images_per_s"] if case in rates else None
            elif out:
                lines = [json.loads(line) for line in open(os.path.join(out, "history.jsonl")) if "it_per_s" in line]
                rate, unit = float(np.median([r["it_per_s"] for r in lines[2:] or lines])), "steps/s"
                length = args.script_steps
                benchmark = rates[case]["steps_per_s"] if case in rates else None
            else:
                rate, unit, length, benchmark = None, None, max(1, args.train_images // 10), None
            report.append({"script": command[0], "case": case, "length": length, "wall_s": wall, "rate": rate,
                           "unit": unit, "benchmark_rate": benchmark,
                           "ratio": rate / benchmark if rate and benchmark else None})
    return report


# ----------------------------------------------------------------------------- a profile of one case

def idle_gaps(intervals):
    """(busy, wall, gaps) of a device from its kernels' (start, end) times: the time some kernel ran,
    the time from the first start to the last end, and the idle gaps between kernels as (length,
    start), longest first."""
    intervals = sorted(intervals)
    busy, gaps, reach = 0.0, [], intervals[0][0]
    for start, end in intervals:
        if start > reach:
            gaps.append((start - reach, reach))
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy, reach - intervals[0][0], sorted(gaps, reverse=True)


def running_at(operators, time):
    """The CPU operators (start, end, name) running at `time`, outermost first: what the CPU was
    doing while the device waited (a synchronisation, the optimiser, Python between launches)."""
    around = [(start - end, name) for start, end, name in operators if start <= time <= end]
    return " > ".join(name for _, name in sorted(around)) or "no operator"


def profile_case(args, device, case):
    """--profile: --steps steps of one case in its steady state under torch.profiler. Prints the
    operators and kernels by their own time on the device (on the CPU: by CPU time) and, on a GPU,
    how long it sat idle between kernels: the time Python, kernel launches or a synchronisation
    left it waiting."""
    from torch.profiler import ProfilerActivity, profile
    dataset, precision = args.datasets[0], "bf16" if device.type == "cuda" else "fp32"
    step, images_per_step, _, _ = build_case(args, device, dataset, case, precision, device.type == "cuda",
                                             args.compile)
    seconds = time_steps(step, args, device, args.compile)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(device)
    table = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":  # torch before 2.4 calls the device's time "cuda"
        key = "self_device_time_total" if hasattr(table[0], "self_device_time_total") else "self_cuda_time_total"
    print(f"{dataset} {case} {precision}{' compiled' if args.compile else ''}: {1 / seconds:.2f} steps/s unprofiled; "
          f"the profile of {args.steps} steps, by {key}:")
    print(table.table(sort_by=key, row_limit=25))
    top = sorted(table, key=lambda e: getattr(e, key), reverse=True)[:25]
    result = {"dataset": dataset, "case": case, "precision": precision, "compile": args.compile, "steps": args.steps,
              "steps_per_s": 1 / seconds, "images_per_step": images_per_step,
              "top": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in top]}
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA]
    # Each operator Python starts costs the host microseconds whatever its size: many, and the GPU waits for the host.
    result.update(operators_per_step=sum(e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None
                                         for e in events) / args.steps, kernels_per_step=len(kernels) / args.steps)
    print(f"a step starts {result['operators_per_step']:.0f} operators from Python" +
          (f" and runs {result['kernels_per_step']:.0f} kernels" if kernels else ""))
    if kernels:  # times in microseconds
        busy, wall, gaps = idle_gaps(kernels)
        operators = [(e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CPU]
        longest = [{"ms": length / 1e3, "cpu": running_at(operators, start + length / 2)}
                   for length, start in gaps[:10]]
        result.update(device_busy_ms=busy / 1e3, device_wall_ms=wall / 1e3, gaps=len(gaps), longest_gaps=longest,
                      gaps_over_50us_ms=sum(length for length, _ in gaps if length > 50) / 1e3)
        print(f"the device ran kernels {100 * busy / wall:.0f}% of {wall / 1e3:.1f} ms "
              f"({wall / 1e3 / args.steps:.1f} ms a step); "
              f"{len(gaps)} idle gaps, {result['gaps_over_50us_ms']:.1f} ms of them in gaps over 50 us; the longest, "
              "and what the CPU ran meanwhile:", *(f"  {g['ms']:.2f} ms  {g['cpu']}" for g in longest[:5]), sep="\n")
    if args.trace:
        def write_trace(tmp):  # marked as ours before it takes its name, so that the same command may replace it
            prof.export_chrome_trace(tmp)
            Path(tmp).write_text(json.dumps({**json.loads(Path(tmp).read_text()), "written_by": "benchmark.py"}))
        outputs.atomic_write(args.trace, write_trace)
        print(f"trace written to {args.trace}")
    return result


def print_report(report):
    print(f"\n{report['device']}, torch {report['torch']}, torchvision {report['torchvision']}, {report['backbone']}")
    print(f"{'dataset':<11}{'case':<22}{'prec.':<6}{'layout':<8}{'compile':<8}{'step/s [range]':>22}{'img/s':>8}"
          f"{'peak GB':>9}{'TFLOP/step':>11}{'TFLOP/s':>9}{'of peak':>8}")
    for r in report["cases"]:
        memory = f"{r['peak_memory_gb']:9.1f}" if r["peak_memory_gb"] is not None else f"{'-':>9}"
        share = f"{100 * r['share_of_peak']:7.0f}%" if r["share_of_peak"] else f"{'-':>8}"
        low, high = r["steps_per_s_range"]
        print(f"{r['dataset']:<11}{r['case']:<22}{r['precision']:<6}{'NHWC' if r['channels_last'] else 'NCHW':<8}"
              f"{'yes' if r['compile'] else 'no':<8}{r['steps_per_s']:8.2f} [{low:.2f}-{high:.2f}]"
              f"{r['images_per_s']:8.1f}{memory}"
              f"{r['tflop_per_step']:11.3f}{r['tflop_per_s']:9.1f}{share}")
    for dataset, rates in report["loaders"].items():
        print(f"data loader, {dataset}, {report['workers']} workers: "
              + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
    for dataset, projection in report["projection"].items():
        if projection:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in projection["hours"].items())
            print(f"projected {dataset} pipeline at its default lengths: {projection['total_hours']:.2f} h ({parts})")
    for s in report.get("scripts", []):
        rate = f"{s['rate']:.2f} {s['unit']}" if s["rate"] else "-"
        versus = f", the step benchmark {s['benchmark_rate']:.2f}: {s['ratio']:.2f} of it" if s["ratio"] else ""
        print(f"{s['script']:<24} {s['length']:>6} {'steps' if s['unit'] == 'steps/s' else 'images'}: "
              f"{s['wall_s']:6.1f} s "
              f"wall, its steady rate {rate}{versus}")


def main(argv=None):
    args = get_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = common.init_distributed_mode(args)
    evaluate.check_result_file(args.json, "--json", "benchmark.py")
    if args.trace:
        evaluate.check_result_file(args.trace, "--trace", "benchmark.py")
    torch.manual_seed(0)
    about = {"written_by": "benchmark.py",
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
             "backbone": args.backbone, "shrink": args.shrink}
    if args.profile:
        outputs.write_json(args.json, {**about, "profile": profile_case(args, device, args.profile)})
        print(f"written to {args.json}")
        return
    if args.scripts:  # the cases the scripts run, at their precision and layout
        precision = "bf16" if args.amp and device.type == "cuda" else "fp32"
        todo = [("voc", case, precision, device.type == "cuda", False)
                for case in ["stage 1", "multi-task, ĝ", "pseudo-labels / eval"]]
    else:
        todo = plan(args, device)
    results, flop_counts = [], {}
    for case in todo:
        results.append(time_case(args, device, *case, flop_counts))
        r = results[-1]
        print(f"{r['dataset']} {r['case']} {r['precision']} {'NHWC' if r['channels_last'] else 'NCHW'}"
              f"{' compiled' if r['compile'] else ''}: {r['steps_per_s']:.2f} steps/s [{r['steps_per_s_range'][0]:.2f}-"
              f"{r['steps_per_s_range'][1]:.2f}] after {r['warmup_steps']} warm-up steps, "
              f"{r['images_per_s']:.1f} images/s", flush=True)
    loaders = {}
    if args.data_root:
        description = common.describe_dataset(args.data_root)
        loaders[description.kind] = time_loaders(args, description.kind, args.data_root)
    elif args.loader_images and not args.scripts:
        with tempfile.TemporaryDirectory() as folder:
            for dataset in args.datasets:
                # 2048x1024 PNGs are slow to write
                count = args.loader_images if dataset == "voc" else max(3, args.loader_images // 3)
                root = write_images(os.path.join(folder, dataset), dataset, count,
                                    shrunk(DATASETS[dataset], args)["image"])
                loaders[dataset] = time_loaders(args, dataset, root)
    report = {**about, "workers": args.workers, "cases": results, "loaders": loaders,
              "projection": {} if args.scripts else {dataset: project(results, loaders, dataset)
                                                     for dataset in args.datasets}}
    if args.scripts:
        report["scripts"] = run_scripts(args, device, results)
    outputs.write_json(args.json, report)
    print_report(report)
    print(f"written to {args.json}")


if __name__ == "__main__":
    outputs.run_main(main)
