"""The multi-task mean-teacher training of Ke et al. (IEEE TIP 2022), paper stages 2 and 3.

    python stage3_multitask.py --labeled 1464 --pseudo runs/pseudo1 --aux-head separate --out runs/stage2
    python stage3_multitask.py --labeled 1464 --pseudo runs/pseudo2 --aux-head shared --out runs/stage3

A student and its EMA teacher. Each step takes labelled images (x_l, y_l) and images of the whole
training set x_u (labelled ones too) with their pseudo-masks p from --pseudo. The weak view
(scale, crop, flip) is shared; the student's x_u also gets a strong photometric view S (two
RandAugment-style operations and Cutout), so targets stay aligned. With t the teacher's argmax on
the weak x_u and CE the cross-entropy ignoring 255:
    L_sup = CE(g(x_l), y_l)      L_con = CE(g(S(x_u)), t)      L_aux = CE(aux(S(x_u)), p)
    L = w_sup * L_sup + w_con * (L_con + L_aux) / 2
The auxiliary head is ĝ (--aux-head separate: its own copy of the last backbone stage) or g̃
(shared: a second head on the shared last stage). The teacher's main head is the model that
evaluate.py and stage2_pseudolabel.py use.
"""
import argparse
import math
import os
import random

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

import common

STAGE3_FLAGS = ["pseudo", "aux_head", "batch_labeled", "batch_unlabeled", "w_sup", "w_con", "ema_decay", "init"]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, default_out="runs/stage3")
    method = parser.add_argument_group("multi-task mean teacher")
    method.add_argument("--pseudo", required=True, help="folder of pseudo-masks <id>.png (stage2_pseudolabel.py's --out)")
    method.add_argument("--aux-head", choices=["separate", "shared"], default="separate",
                        help="separate: ĝ with its own last backbone stage (paper stage 2); "
                             "shared: g̃ on the shared last stage (paper stage 3) (default: %(default)s)")
    method.add_argument("--batch-labeled", type=int, default=1, help="labelled images per step (default: %(default)s)")
    method.add_argument("--batch-unlabeled", type=int, default=9,
                        help="images of the whole training set per step (default: %(default)s, the authors' 1 + 9)")
    method.add_argument("--w-sup", type=float, default=1.0, help="weight of L_sup (default: %(default)s)")
    method.add_argument("--w-con", type=float, default=0.5, help="weight of (L_con + L_aux) / 2 (default: %(default)s)")
    method.add_argument("--ema-decay", type=float,
                        help="a constant teacher decay (default: 0.99, 0.995, 0.9975, 0.999 after 0, 1/3, 2/3, 5/6 of training)")
    method.add_argument("--init", help="start from this checkpoint's weights (its teacher's, if it has one) "
                                       "instead of the ImageNet backbone; the auxiliary head starts fresh")
    parser.set_defaults(epochs=50)  # over the whole training set: about the authors' 60,000 steps of 1 + 9 on VOC
    args = parser.parse_args(argv)
    return parser, args


def ema_decay(step, iters, constant=None):
    """METHOD.md's schedule by share of training done, unless a constant decay is given."""
    if constant is not None:
        return constant
    done = step / iters
    return 0.99 if done < 1 / 3 else 0.995 if done < 2 / 3 else 0.9975 if done < 5 / 6 else 0.999


def make_teacher(student, decay):
    """The EMA teacher: torch's AveragedModel over weights and BN buffers; decay is a one-item list
    read at each update, so the schedule can change it. Integer buffers are copied."""
    def average(teacher_value, student_value, n_averaged):
        if not teacher_value.is_floating_point():
            return student_value
        return decay[0] * teacher_value + (1 - decay[0]) * student_value
    teacher = AveragedModel(student, avg_fn=average, use_buffers=True)
    teacher.update_parameters(student)  # the first update copies: the teacher starts as the student
    return teacher.eval()


class StrongViewDataset(torch.utils.data.Dataset):
    """Images with their pseudo-masks: (weak view, strong view of it, pseudo-mask, index)."""

    def __init__(self, images, weak, strong):
        self.images, self.weak, self.strong = images, weak, strong

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, pseudo = self.weak(*self.images.load(index))
        return common.normalize(image), common.normalize(self.strong(image)), pseudo.long(), index


def losses(student, teacher, labeled_batch, unlabeled_batch, w_sup, w_con, device, amp):
    """L_sup, L_con, L_aux and the total L of one step. A term whose weight is 0 is not computed,
    so that its inputs play no part (no gradient reaches the auxiliary head when w_con = 0)."""
    x_l, y_l = labeled_batch
    x_weak, x_strong, pseudo = unlabeled_batch
    with torch.no_grad(), common.autocast(device, amp):
        target = teacher(x_weak).argmax(1)
    inputs = [x for x, weight in [(x_l, w_sup), (x_strong, w_con)] if weight]
    with common.autocast(device, amp):
        out = student(torch.cat(inputs), with_aux=w_con != 0)  # one forward: BN sees both streams
    logits, aux = (out[0].float(), out[1].float()) if w_con else (out.float(), None)
    zero = logits.sum() * 0
    n_l = len(x_l) if w_sup else 0
    terms = {
        "L_sup": F.cross_entropy(logits[:n_l], y_l, ignore_index=common.IGNORE) if w_sup else zero,
        "L_con": F.cross_entropy(logits[n_l:], target, ignore_index=common.IGNORE) if w_con else zero,
        "L_aux": F.cross_entropy(aux[n_l:], pseudo, ignore_index=common.IGNORE) if w_con else zero,
    }
    terms["L"] = w_sup * terms["L_sup"] + w_con * (terms["L_con"] + terms["L_aux"]) / 2
    return terms


def check_pseudo(pseudo, ids):
    if not os.path.isdir(pseudo):
        raise common.UserError(f"--pseudo {pseudo} is not a folder (write it with stage2_pseudolabel.py)")
    missing = [i for i in ids if not os.path.exists(os.path.join(pseudo, f"{i}.png"))]
    if missing:
        raise common.UserError(f"--pseudo {pseudo} lacks the pseudo-masks of {len(missing)} of {len(ids)} training "
                               f"images (first: {', '.join(missing[:3])}); run or finish stage2_pseudolabel.py")


def load_init(student, path):
    """Start from another checkpoint's weights (its mean teacher's, where it has one). The
    auxiliary head starts fresh, and a separate last stage starts as a copy of the main one, as
    they do from ImageNet weights."""
    checkpoint = common.load_checkpoint(path)
    weights = checkpoint.get("teacher", checkpoint["model"])
    weights = {k: v for k, v in weights.items() if not k.startswith(("aux_head.", "aux_last_stage."))}
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError:
        missing, unexpected = ["(shapes differ)"], []
    if unexpected or any(not key.startswith(("aux_head.", "aux_last_stage.")) for key in missing):
        raise common.UserError(f"--init {path} does not fit this --backbone and class count")
    if student.aux_last_stage is not None:
        student.aux_last_stage.load_state_dict(student.last_stage.state_dict())


def main(argv=None):
    parser, args = get_args(argv)
    checkpoint_path = common.prepare_out_dir(args.out, args.resume)
    checkpoint = common.load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        args = common.resume_args(parser, args, checkpoint, common.RECIPE_FLAGS + STAGE3_FLAGS + ["pseudo_source"], argv)
    common.check_training_args(args)
    for flag in ["batch_labeled", "batch_unlabeled"]:
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.w_sup < 0 or args.w_con < 0 or (args.ema_decay is not None and not 0 <= args.ema_decay < 1):
        raise common.UserError("--w-sup and --w-con cannot be negative, and --ema-decay must be in [0, 1)")
    common.check_data_root(args.data_root)
    device = common.pick_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    class_names = common.read_class_names(args.data_root)
    labeled, unlabeled = common.split_of_run(args, checkpoint)
    everything = sorted(labeled + unlabeled)  # the unlabelled stream: the whole training set
    check_pseudo(args.pseudo, everything)
    source_file = os.path.join(args.pseudo, "source.json")
    pseudo_source = common.file_sha256(source_file) if os.path.exists(source_file) else None
    if checkpoint is not None and pseudo_source != args.pseudo_source:
        raise common.UserError(f"--pseudo {args.pseudo} was rewritten since this run started; start a new run in another --out")
    args.pseudo_source = pseudo_source
    if args.iters is None:
        args.iters = math.ceil(args.epochs * len(everything) / args.batch_unlabeled)
    common.write_ids(os.path.join(args.out, "labeled.txt"), labeled)
    common.write_ids(os.path.join(args.out, "unlabeled.txt"), unlabeled)
    print(f"{len(labeled)} labelled images, {len(everything)} with pseudo-masks from {args.pseudo}, "
          f"{len(class_names)} classes; {args.iters} steps of {args.batch_labeled} + {args.batch_unlabeled} on {device}, "
          f"auxiliary head: {args.aux_head}")

    weak = common.weak_augment(args.crop_size, args.scale_range)
    labeled_set = common.SegmentationDataset(
        args.data_root, labeled, len(class_names), lambda i: common.train_mask_path(args.data_root, i),
        transform=common.labeled_augment(args.crop_size, args.scale_range, args.strong_aug))
    pseudo_set = common.SegmentationDataset(args.data_root, everything, len(class_names),
                                            lambda i: os.path.join(args.pseudo, f"{i}.png"))
    labeled_batches = common.infinite(common.train_loader(labeled_set, args.batch_labeled, args.workers))
    unlabeled_batches = common.infinite(common.train_loader(
        StrongViewDataset(pseudo_set, weak, common.strong_augment()), args.batch_unlabeled, args.workers))
    val_loader = common.full_image_loader(common.val_dataset(args.data_root, len(class_names)), 1, args.workers)

    student = common.build_model(args.backbone, len(class_names), not args.no_pretrained and not args.init,
                                 aux_head=args.aux_head)
    if args.init and checkpoint is None:
        load_init(student, args.init)
    student.to(device)
    optimizer, scheduler = common.make_optimizer(student, args)
    step = 0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step = checkpoint["step"]
    decay = [ema_decay(step, args.iters, args.ema_decay)]
    teacher = make_teacher(student, decay)
    if checkpoint is not None:
        teacher.module.load_state_dict(checkpoint["teacher"])
        print(f"resuming {checkpoint_path} at step {step}")

    def save(step):
        common.save_checkpoint(checkpoint_path, {
            "model": student.state_dict(), "teacher": teacher.module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "args": vars(args), "labeled": labeled,
            "unlabeled": unlabeled, "class_names": class_names, "stage": 3})

    def validate():
        main_head = common.evaluate(teacher.module, val_loader, device, len(class_names), args.amp)
        aux_head = common.evaluate(teacher.module, val_loader, device, len(class_names), args.amp, head=1)
        return main_head, aux_head

    progress = common.Progress(step, args.iters)
    while step < args.iters:
        x_l, y_l, _ = next(labeled_batches)
        x_weak, x_strong, pseudo, _ = next(unlabeled_batches)
        student.train()
        terms = losses(student, teacher, (x_l.to(device), y_l.to(device)),
                       (x_weak.to(device), x_strong.to(device), pseudo.to(device)), args.w_sup, args.w_con, device, args.amp)
        optimizer.zero_grad(set_to_none=True)
        terms["L"].backward()
        optimizer.step()
        scheduler.step()
        step += 1
        decay[0] = ema_decay(step, args.iters, args.ema_decay)
        teacher.update_parameters(student)
        if not math.isfinite(terms["L"].item()):
            raise SystemExit(f"error: the loss became {terms['L'].item()} at step {step}; lower --lr (the last checkpoint is kept)")
        if step % args.print_every == 0 or step == args.iters:
            values = {name: value.item() for name, value in terms.items()}
            print(f"{progress.line(step, values, scheduler.get_last_lr()[0])}  ema {decay[0]}", flush=True)
        if step % args.save_every == 0 or step == args.iters:
            save(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.iters:
            main_head, aux_head = validate()
            print(f"step {step}: teacher val mIoU {main_head.miou():.2f} (auxiliary head {aux_head.miou():.2f})")

    main_head, aux_head = validate()
    print(f"teacher's main head, val IoU after {step} steps:\n{main_head.table(class_names)}")
    print(f"teacher's auxiliary head ({args.aux_head}): val mIoU {aux_head.miou():.2f}")
    common.write_json(os.path.join(args.out, "metrics.json"), {
        "step": step, **main_head.report(class_names), "aux_miou": aux_head.miou()})


if __name__ == "__main__":
    common.run_main(main)
