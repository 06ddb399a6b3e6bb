"""Speed and memory of every stage at its real shapes, and the projected time of the whole pipeline.

    python benchmark.py                          on a GPU: VOC and Cityscapes shapes, ResNet-101, bf16 and fp32
    python benchmark.py --compile                also torch.compile'd training steps (minutes of compiling)
    python benchmark.py --device cpu --backbone tiny_unet --shrink 8 --steps 2 --warmup 1   a quick check on the CPU

For each case (stage 1 at batch 16, the multi-task step at 1 + 9 with ĝ and with g̃, the
pseudo-labelling and evaluation forward at VOC's image size; Cityscapes' batch 4, 1 + 4, 256x512
crops and 2048x1024 images at half scale) it times the scripts' own step functions on random data
and reports steps/s, images/s, peak memory (torch.cuda.max_memory_allocated), the FLOPs of a step
as torch's FlopCounterMode counts them, the achieved TFLOP/s and, on a known GPU, its share of the
card's dense peak. Separately it times the data loaders (decoding and augmentation, with
--workers processes) on images it writes at the datasets' sizes (or on --data-root), so you see
whether the GPU would wait for data. It ends with the projected wall time of the whole pipeline
at its default lengths. It prints a table and writes everything to --json.
"""
import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import common
import stage1_train
import stage3_multitask

# The scripts' default recipes: the shapes of each step and the lengths of each stage.
DATASETS = {
    "voc": dict(classes=21, batch=16, crop=(321, 321), labeled=1, unlabeled=9, image=(375, 500), image_scale=1.0,
                stage1_iters=stage1_train.IMAGES_SEEN // 16, multitask_iters=stage3_multitask.DEFAULT_ITERS,
                train_images=10582, val_images=1449),
    "cityscapes": dict(classes=19, batch=4, crop=(256, 512), labeled=1, unlabeled=4, image=(1024, 2048), image_scale=0.5,
                       stage1_iters=20_000, multitask_iters=stage3_multitask.DEFAULT_ITERS,
                       train_images=2975, val_images=500),
}
INFERENCE_BATCH = 8  # stage2_pseudolabel.py's and evaluate.py's default


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present, else cpu)")
    parser.add_argument("--backbone", choices=common.BACKBONES, default="resnet101", help="(default: %(default)s)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS), help="(default: both)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first, for cuDNN's algorithm search and the allocator (default: %(default)s)")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every image side and batch by this, for a quick run on the CPU (default: 1)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="(default: all)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd training steps in bf16 (minutes of compiling)")
    parser.add_argument("--loader-images", type=int, default=48,
                        help="images written at each dataset's size to time the data loaders; 0 skips them (default: %(default)s)")
    parser.add_argument("--data-root", help="time the loaders on this dataset instead of written images")
    parser.add_argument("--workers", type=int, default=common.default_workers(),
                        help="data-loading processes, as the scripts' default (default: %(default)s)")
    parser.add_argument("--json", default="benchmark.json", help="write every figure here (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.steps, args.shrink) < 1 or args.warmup < 0 or args.loader_images < 0 or args.workers < 0:
        raise common.UserError("--steps and --shrink must be at least 1, --warmup, --loader-images and --workers at least 0")
    return args


def shrunk(shape, args):
    """A dataset's shapes divided by --shrink (sides at least 16 pixels, batches at least 1)."""
    side = lambda x: max(16, x // args.shrink)  # noqa: E731
    count = lambda x: max(1, x // args.shrink)  # noqa: E731
    return {**shape, "batch": count(shape["batch"]), "labeled": count(shape["labeled"]), "unlabeled": count(shape["unlabeled"]),
            "crop": tuple(map(side, shape["crop"])), "image": tuple(map(side, shape["image"]))}


def recipe(args, shape, precision, channels_last, compile, aux_head=None):
    """The flags a script would have for this case."""
    return argparse.Namespace(
        backbone=args.backbone, batch_size=shape["batch"], batch_labeled=shape["labeled"], batch_unlabeled=shape["unlabeled"],
        crop_size=list(shape["crop"]), aux_head=aux_head, weights="none", optimizer="sgd", lr=1e-3, head_lr_mult=10.0,
        weight_decay=1e-4, warmup=0, iters=10**9, w_sup=1.0, w_con=0.5, ema_decay=None, amp=precision == "bf16",
        channels_last=channels_last, compile=compile, distributed=False)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step, args, device):
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":  # the steady state's peak, not cuDNN's workspace trials in the first steps
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / args.steps


def random_batch(n, crop, classes, device, channels_last):
    images = common.to_device(torch.randn(n, 3, *crop), device, channels_last)
    return images, torch.randint(0, classes, (n, *crop), device=device)


def stage1_case(args, shape, device, flags):
    model = common.build_model(args.backbone, shape["classes"], weights="none")
    optimizer, scheduler = common.make_optimizer(model, flags)
    net = common.prepare_model(model, flags, device)
    images, masks = random_batch(shape["batch"], shape["crop"], shape["classes"], device, flags.channels_last)
    step = lambda: stage1_train.train_one_step(net, images, masks, optimizer, scheduler, flags.amp)  # noqa: E731
    return step, shape["batch"], lambda: stage1_train.step_flops(flags, shape["classes"])


def multitask_case(args, shape, device, flags):
    student = common.build_model(args.backbone, shape["classes"], weights="none", aux_head=flags.aux_head)
    optimizer, scheduler = common.make_optimizer(student, flags)
    net = common.prepare_model(student, flags, device)
    decay = [0.99]
    teacher = stage3_multitask.make_teacher(student, decay)
    teacher_net = torch.compile(teacher) if flags.compile else teacher
    x_l, y_l = random_batch(shape["labeled"], shape["crop"], shape["classes"], device, flags.channels_last)
    x_weak, p = random_batch(shape["unlabeled"], shape["crop"], shape["classes"], device, flags.channels_last)
    x_strong, _ = random_batch(shape["unlabeled"], shape["crop"], shape["classes"], device, flags.channels_last)
    _, (_, _, _, source) = stage3_multitask.fake_batches(flags)
    labeled, unlabeled = (x_l, y_l, y_l.clone()), (x_weak, x_strong, p, source.to(device))
    step = lambda: stage3_multitask.train_one_step(net, teacher_net, labeled, unlabeled, optimizer, scheduler, decay, flags)  # noqa: E731
    return step, shape["labeled"] + shape["unlabeled"], lambda: stage3_multitask.step_flops(flags, shape["classes"])


def inference_case(args, shape, device, flags):
    """The forward of stage2_pseudolabel.py and evaluate.py: full images at the training scale."""
    model = common.speed_setup(common.build_model(args.backbone, shape["classes"], weights="none").to(device).eval(),
                               device, flags.channels_last)
    n = max(1, INFERENCE_BATCH // args.shrink)
    images = common.to_device(torch.randn(n, 3, *shape["image"]), device, flags.channels_last)
    step = lambda: common.predict_probs(model, images, scales=[shape["image_scale"]], amp=flags.amp)  # noqa: E731
    def count_flops():
        with torch.device("meta"):
            meta_model = common.build_model(args.backbone, shape["classes"], weights="none").eval()
            return common.count_flops(lambda: common.predict_probs(meta_model, torch.zeros(n, 3, *shape["image"]),
                                                                   scales=[shape["image_scale"]]))
    return step, n, count_flops


CASES = {"stage 1": (stage1_case, None), "multi-task, ĝ": (multitask_case, "separate"),
         "multi-task, g̃": (multitask_case, "shared"), "pseudo-labels / eval": (inference_case, None)}


def plan(args, device):
    """(dataset, case, precision, channels-last, compile) of every case to time. Channels-last
    and fp32 are compared where they matter most; the rest run in the likely fastest setting."""
    precisions = ["bf16", "fp32"] if device.type == "cuda" else ["fp32"]
    cases = []
    for dataset in args.datasets:
        first = dataset == args.datasets[0]
        for case in args.cases:
            for precision in precisions:
                if precision != precisions[0] and case == "multi-task, g̃":
                    continue
                cases.append((dataset, case, precision, True, False))
                if first and precision == precisions[0] and case != "multi-task, g̃":
                    cases.append((dataset, case, precision, False, False))
            if args.compile and first and case != "pseudo-labels / eval":
                cases.append((dataset, case, precisions[0], True, True))
    return cases


def time_case(args, device, dataset, case, precision, channels_last, compile, flop_counts):
    shape = shrunk(DATASETS[dataset], args)
    build, aux_head = CASES[case]
    flags = recipe(args, shape, precision, channels_last, compile, aux_head)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, images_per_step, count_flops = build(args, shape, device, flags)
    if (dataset, case) not in flop_counts:  # the same for every precision and layout
        flop_counts[dataset, case] = count_flops()
    flops = flop_counts[dataset, case]
    seconds = seconds_per_step(step, args, device)
    peak = common.peak_flops(device, flags.amp)
    return {"dataset": dataset, "case": case, "precision": precision, "channels_last": channels_last, "compile": compile,
            "images_per_step": images_per_step, "steps_per_s": 1 / seconds, "images_per_s": images_per_step / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "tflop_per_step": flops / 1e12, "tflop_per_s": flops / seconds / 1e12,
            "share_of_peak": flops / seconds / peak if peak else None}


# ----------------------------------------------------------------------------- the data loaders

def write_images(root, dataset, count, size):
    """`count` smooth synthetic images (so they compress like photographs) and masks in the
    dataset's layout, for timing the loaders."""
    rng = np.random.default_rng(0)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    ids = [f"img_{i:05d}" for i in range(count)]
    for image_id in ids:
        a, b, c = rng.uniform(0.002, 0.02, size=3)
        image = (127 + 120 * np.stack([np.sin(a * xx + b * yy), np.sin(b * xx - c * yy), np.sin(c * xx + a * yy)], -1)).astype(np.uint8)
        mask = ((xx * a * 10 + yy * b * 10).astype(int) % 5).astype(np.uint8)
        if dataset == "voc":
            for folder in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"]:
                os.makedirs(os.path.join(root, folder), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90)
            Image.fromarray(mask, mode="L").save(os.path.join(root, "SegmentationClass", f"{image_id}.png"))
        else:
            for folder in ["leftImg8bit", "gtFine"]:
                for split in ["train", "val"]:
                    os.makedirs(os.path.join(root, folder, split, "city"), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, "leftImg8bit", "train", "city", f"{image_id}_leftImg8bit.png"))
            Image.fromarray(mask + 7, mode="L").save(os.path.join(root, "gtFine", "train", "city", f"{image_id}_gtFine_labelIds.png"))
    if dataset == "voc":
        for name in ["train", "val"]:
            common.write_ids(os.path.join(root, "ImageSets", "Segmentation", f"{name}.txt"), ids if name == "train" else [])
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
    and the full images of pseudo-labelling and evaluation."""
    shape = DATASETS[dataset]
    description = common.describe_dataset(root)
    ids = description.train_ids
    flags = argparse.Namespace(crop_size=list(shape["crop"]), scale_range=[0.5, 1.5] if dataset == "voc" else [1.0, 1.0],
                               image_scale=shape["image_scale"])
    weak = common.weak_augment(common.crop_of(flags), common.train_scale_range(flags))
    labeled = common.true_mask_dataset(description, ids, common.labeled_augment(common.crop_of(flags), common.train_scale_range(flags), False))
    strong = stage3_multitask.StrongViewDataset(common.true_mask_dataset(description, ids), weak)
    full = common.true_mask_dataset(description, ids, masks_optional=True)
    full.ids = full.ids * 100  # the full-image loader's pass, made long enough to time
    return {
        "stage 1": images_per_second(common.train_batches(labeled, shape["batch"], args.workers, 0), args.workers),
        "multi-task (weak + S)": images_per_second(common.train_batches(strong, shape["unlabeled"], args.workers, 0), args.workers),
        "pseudo-labels / eval": images_per_second(iter(common.full_image_loader(full, INFERENCE_BATCH, args.workers)), args.workers),
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
        rate = min(best[case]["images_per_s"], loader.get(loader_name, math.inf))
        return count / rate
    parts = {
        "stage 1": seconds("stage 1", shape["stage1_iters"] * shape["batch"], "stage 1"),
        "multi-task, ĝ": seconds("multi-task, ĝ", shape["multitask_iters"] * (shape["labeled"] + shape["unlabeled"]), "multi-task (weak + S)"),
        "multi-task, g̃": seconds("multi-task, g̃", shape["multitask_iters"] * (shape["labeled"] + shape["unlabeled"]), "multi-task (weak + S)"),
        # three rounds of pseudo-masks; val evaluated once after stage 1, twice (both heads) after each multi-task stage, once by evaluate.py
        "pseudo-labels and evaluation": seconds("pseudo-labels / eval", 3 * shape["train_images"] + 6 * shape["val_images"], "pseudo-labels / eval"),
    }
    return {"hours": {k: v / 3600 for k, v in parts.items()}, "total_hours": sum(parts.values()) / 3600,
            "settings": {k: {key: r[key] for key in ["precision", "channels_last", "compile"]} for k, r in best.items()}}


def print_report(report):
    print(f"\n{report['device']}, torch {report['torch']}, torchvision {report['torchvision']}, {report['backbone']}")
    print(f"{'dataset':<11}{'case':<22}{'prec.':<6}{'layout':<8}{'compile':<8}{'step/s':>8}{'img/s':>8}"
          f"{'peak GB':>9}{'TFLOP/step':>11}{'TFLOP/s':>9}{'of peak':>8}")
    for r in report["cases"]:
        memory = f"{r['peak_memory_gb']:9.1f}" if r["peak_memory_gb"] is not None else f"{'-':>9}"
        share = f"{100 * r['share_of_peak']:7.0f}%" if r["share_of_peak"] else f"{'-':>8}"
        print(f"{r['dataset']:<11}{r['case']:<22}{r['precision']:<6}{'NHWC' if r['channels_last'] else 'NCHW':<8}"
              f"{'yes' if r['compile'] else 'no':<8}{r['steps_per_s']:8.2f}{r['images_per_s']:8.1f}{memory}"
              f"{r['tflop_per_step']:11.3f}{r['tflop_per_s']:9.1f}{share}")
    for dataset, rates in report["loaders"].items():
        print(f"data loader, {dataset}, {report['workers']} workers: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
    for dataset, projection in report["projection"].items():
        if projection:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in projection["hours"].items())
            print(f"projected {dataset} pipeline at its default lengths: {projection['total_hours']:.2f} h ({parts})")


def main(argv=None):
    args = get_args(argv)
    device = common.pick_device(args.device)
    torch.manual_seed(0)
    results, flop_counts = [], {}
    for case in plan(args, device):
        results.append(time_case(args, device, *case, flop_counts))
        r = results[-1]
        print(f"{r['dataset']} {r['case']} {r['precision']} {'NHWC' if r['channels_last'] else 'NCHW'}"
              f"{' compiled' if r['compile'] else ''}: {r['steps_per_s']:.2f} steps/s, {r['images_per_s']:.1f} images/s", flush=True)
    loaders = {}
    if args.data_root:
        loaders[common.describe_dataset(args.data_root).name] = time_loaders(args, common.describe_dataset(args.data_root).name, args.data_root)
    elif args.loader_images:
        with tempfile.TemporaryDirectory() as folder:
            for dataset in args.datasets:
                size = shrunk(DATASETS[dataset], args)["image"]
                count = args.loader_images if dataset == "voc" else max(3, args.loader_images // 3)  # 2048x1024 PNGs are slow to write
                root = write_images(os.path.join(folder, dataset), dataset, count, size)
                loaders[dataset] = time_loaders(args, dataset, root)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "torchvision": __import__("torchvision").__version__, "backbone": args.backbone,
              "shrink": args.shrink, "workers": args.workers, "cases": results, "loaders": loaders,
              "projection": {dataset: project(results, loaders, dataset) for dataset in args.datasets}}
    common.write_json(args.json, report)
    print_report(report)
    print(f"written to {args.json}")


if __name__ == "__main__":
    common.run_main(main)
