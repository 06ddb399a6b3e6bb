"""The multi-task mean-teacher training of Ke et al. (IEEE TIP 2022), paper stages 2 and 3.

    python stage3_multitask.py --labeled 1464 --pseudo runs/pseudo1 --aux-head separate --out runs/stage2
    python stage3_multitask.py --labeled 1464 --pseudo runs/pseudo2 --aux-head shared --out runs/stage3

A student and its EMA teacher, as in the authors' training step. Each step takes labelled images
x_l (true masks y_l) and images of the whole training set x_u (labelled ones too), each with its
pseudo-mask p from --pseudo. All get the weak view (scale, crop, flip); x_u also gets the strong
augmentation S (3 of RandAugment's 14 operations and Cutout), whose geometric operations move
p and the teacher's target with the image. The teacher sees the weak views [x_l, x_u]; its
argmax t is carried through S's warp. The student sees [x_l, S(x_u)]. With CE the cross-entropy
ignoring 255, over the whole batch where not said otherwise:
    L_sup = CE(g(x_l), y_l)      L_con = CE(g([x_l, S(x_u)]), t)      L_aux = CE(aux([x_l, S(x_u)]), p)
    L = w_sup * L_sup + w_con * (L_con + L_aux) / 2
The auxiliary head is ĝ (--aux-head separate: a new last backbone stage of its own, half as wide,
fed by the stage before) or g̃ (shared: a second head on the shared last stage). The teacher's
main head is the model that evaluate.py and stage2_pseudolabel.py use.
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
DEFAULT_ITERS = 60_000  # the authors' length of each multi-task stage, on VOC and on Cityscapes


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, default_out="runs/stage3", default_length=f"{DEFAULT_ITERS:,}, the authors'")
    method = parser.add_argument_group("multi-task mean teacher")
    method.add_argument("--pseudo", help="folder of pseudo-masks <id>.png (stage2_pseudolabel.py's --out); required "
                                         "but with --resume, which takes the run's")
    method.add_argument("--aux-head", choices=["separate", "shared"], default="separate",
                        help="separate: ĝ with a new, half-width last backbone stage of its own (paper stage 2); "
                             "shared: g̃ on the shared last stage (paper stage 3) (default: %(default)s)")
    method.add_argument("--batch-labeled", type=int, default=1,
                        help="labelled images per step, over all processes (default: %(default)s)")
    method.add_argument("--batch-unlabeled", type=int, default=9,
                        help="images of the whole training set per step (default: %(default)s, the authors' 1 + 9 on VOC)")
    method.add_argument("--w-sup", type=float, default=1.0, help="weight of L_sup (default: %(default)s; 0.5 on Cityscapes)")
    method.add_argument("--w-con", type=float, default=0.5, help="weight of (L_con + L_aux) / 2 (default: %(default)s)")
    method.add_argument("--ema-decay", type=float,
                        help="a constant teacher decay (default: 0.99, 0.995, 0.9975, 0.999 after 0, 1/3, 2/3, 5/6 of training)")
    method.add_argument("--init", help="start from this checkpoint's weights (its teacher's, if it has one) "
                                       "instead of --weights; the auxiliary head and ĝ's stage start fresh")
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
    read at each update, so the schedule can change it. Integer buffers (BN's counters) are copied.
    The teacher needs no gradients (and so no optimiser state)."""
    def average(teacher_tensors, student_tensors, n_averaged):
        if teacher_tensors[0].is_floating_point():
            torch._foreach_lerp_(teacher_tensors, student_tensors, 1 - decay[0])  # one fused update per dtype
        else:
            for t, s in zip(teacher_tensors, student_tensors):
                t.copy_(s)
    teacher = AveragedModel(student, multi_avg_fn=average, use_buffers=True)
    teacher.requires_grad_(False)
    teacher.update_parameters(student)  # the first update copies: the teacher starts as the student
    return teacher.eval()


class LabeledWithPseudo(torch.utils.data.Dataset):
    """Labelled images with their true mask and their own pseudo-mask, under one weak view:
    (x_l, y_l, p_l, index)."""

    def __init__(self, images, pseudo_dir, weak):
        self.images, self.pseudo_dir, self.weak = images, pseudo_dir, weak

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, mask = self.images.load(index)
        pseudo = common.read_mask(os.path.join(self.pseudo_dir, f"{self.images.ids[index]}.png"),
                                  self.images.num_classes, image.shape[-2:])
        image, mask, pseudo = self.weak(image, mask, pseudo)
        return common.normalize(image), mask.long(), pseudo.long(), index


class StrongViewDataset(torch.utils.data.Dataset):
    """Images with their pseudo-masks: (weak view, S of it, the pseudo-mask moved by S, S's source map, index)."""

    def __init__(self, images, weak):
        self.images, self.weak = images, weak

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, pseudo = self.weak(*self.images.load(index))
        strong, source = common.strong_augment(image)
        return common.normalize(image), common.normalize(strong), common.warp(pseudo, source).long(), source, index


def losses(student, teacher, labeled_batch, unlabeled_batch, w_sup, w_con, amp):
    """L_sup, L_con, L_aux and the total L of one step, as the authors' step computes them.

    labeled_batch: (x_l, y_l, p_l); unlabeled_batch: (x_weak, x_strong, p_strong, source). A term
    whose weight is 0 is not computed: with w_con = 0 neither the teacher nor the auxiliary head
    runs, and the student sees x_l alone; with w_sup = 0 the true masks y_l play no part."""
    x_l, y_l, p_l = labeled_batch
    x_weak, x_strong, p_strong, source = unlabeled_batch
    n_l = len(x_l)
    zero = x_l.new_zeros(())
    if not w_con:
        with common.autocast(x_l.device, amp):
            logits = student(x_l).float()
        l_sup = F.cross_entropy(logits, y_l, ignore_index=common.IGNORE)
        return {"L_sup": l_sup, "L_con": zero, "L_aux": zero, "L": w_sup * l_sup}
    with torch.no_grad(), common.autocast(x_l.device, amp):
        teacher_argmax = teacher(torch.cat([x_l, x_weak])).argmax(1)
    # The teacher saw the weak views: its argmax on x_u is moved the way S moved the student's view.
    target = torch.cat([teacher_argmax[:n_l], common.warp(teacher_argmax[n_l:], source)])
    with common.autocast(x_l.device, amp):
        main, aux = student(torch.cat([x_l, x_strong]), with_aux=True)  # one forward: BN sees the whole batch
    main, aux = main.float(), aux.float()
    terms = {
        "L_sup": F.cross_entropy(main[:n_l], y_l, ignore_index=common.IGNORE) if w_sup else zero,
        "L_con": F.cross_entropy(main, target, ignore_index=common.IGNORE),
        "L_aux": F.cross_entropy(aux, torch.cat([p_l, p_strong]), ignore_index=common.IGNORE),
    }
    terms["L"] = w_sup * terms["L_sup"] + w_con * (terms["L_con"] + terms["L_aux"]) / 2
    return terms


def train_one_step(student, teacher, labeled_batch, unlabeled_batch, optimizer, scheduler, decay, args):
    """One optimiser step and the teacher's EMA update; the losses stay on the device."""
    student.train()
    terms = losses(student, teacher, labeled_batch, unlabeled_batch, args.w_sup, args.w_con, args.amp)
    optimizer.zero_grad(set_to_none=True)
    terms["L"].backward()
    optimizer.step()
    scheduler.step()
    decay[0] = ema_decay(scheduler.last_epoch, args.iters, args.ema_decay)  # last_epoch: the steps done
    teacher.update_parameters(unwrap(student))
    return terms


def unwrap(net):
    """The model inside torch.compile's and DistributedDataParallel's wrappers."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def fake_batches(args):
    """A step's batches at the real shapes (zeros), on the current default device."""
    n_l, n_u, crop = args.batch_labeled, args.batch_unlabeled, common.crop_of(args)
    labeled = (torch.zeros(n_l, 3, *crop), torch.zeros(n_l, *crop, dtype=torch.long), torch.zeros(n_l, *crop, dtype=torch.long))
    unlabeled = (torch.zeros(n_u, 3, *crop), torch.zeros(n_u, 3, *crop), torch.zeros(n_u, *crop, dtype=torch.long),
                 torch.arange(crop[0] * crop[1]).view(crop).repeat(n_u, 1, 1))
    return labeled, unlabeled


def step_flops(args, num_classes):
    """FLOPs of one step (teacher forward, student forward and backward), counted on meta tensors."""
    with torch.device("meta"):
        student = common.build_model(args.backbone, num_classes, weights="none", aux_head=args.aux_head)
        teacher = common.build_model(args.backbone, num_classes, weights="none", aux_head=args.aux_head).eval()
        labeled, unlabeled = fake_batches(args)
    return common.count_flops(lambda: losses(student, teacher, labeled, unlabeled, args.w_sup, args.w_con, False)["L"].backward())


def check_pseudo(pseudo, ids):
    if not os.path.isdir(pseudo):
        raise common.UserError(f"--pseudo {pseudo} is not a folder (write it with stage2_pseudolabel.py)")
    missing = [i for i in ids if not os.path.exists(os.path.join(pseudo, f"{i}.png"))]
    if missing:
        raise common.UserError(f"--pseudo {pseudo} lacks the pseudo-masks of {len(missing)} of {len(ids)} training "
                               f"images (first: {', '.join(missing[:3])}); run or finish stage2_pseudolabel.py")


def load_init(student, path):
    """Start from another checkpoint's weights (its mean teacher's, where it has one). The
    auxiliary head and ĝ's own stage start fresh, as they do from ImageNet weights."""
    checkpoint = common.load_checkpoint(path)
    weights = checkpoint.get("teacher", checkpoint["model"])
    new = ("aux_head.", "aux_last_stage.")
    weights = {k: v for k, v in weights.items() if not k.startswith(new)}
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError:
        missing, unexpected = ["(shapes differ)"], []
    if unexpected or any(not key.startswith(new) for key in missing):
        raise common.UserError(f"--init {path} does not fit this --backbone and class count")


def main(argv=None):
    parser, args = get_args(argv)
    checkpoint_path = common.prepare_out_dir(args.out, args.resume)
    checkpoint = common.load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        # --init matters only at the start; --pseudo is checked by its content (pseudo_source) below.
        args = common.resume_args(parser, args, checkpoint, common.RECIPE_FLAGS + STAGE3_FLAGS + ["pseudo_source"], argv,
                                  movable=("data_root", "pseudo", "init"))
    common.check_training_args(args)
    if args.pseudo is None:
        raise common.UserError("give --pseudo DIR, the pseudo-masks of the previous round (stage2_pseudolabel.py's --out)")
    for flag in ["batch_labeled", "batch_unlabeled"]:
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.w_sup < 0 or args.w_con < 0 or (args.ema_decay is not None and not 0 <= args.ema_decay < 1):
        raise common.UserError("--w-sup and --w-con cannot be negative, and --ema-decay must be in [0, 1)")
    description = common.describe_dataset(args.data_root)
    device = common.finish_running_args(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed + args.rank)

    class_names = description.class_names
    labeled, unlabeled = common.split_of_run(args, description, checkpoint)
    everything = sorted(labeled + unlabeled)  # the unlabelled stream: the whole training set
    check_pseudo(args.pseudo, everything)
    source_file = os.path.join(args.pseudo, "source.json")
    pseudo_source = common.file_sha256(source_file) if os.path.exists(source_file) else None
    if checkpoint is not None and pseudo_source != args.pseudo_source:
        raise common.UserError(f"--pseudo {args.pseudo} was rewritten since this run started; start a new run in another --out")
    args.pseudo_source = pseudo_source
    if args.iters is None:
        args.iters = math.ceil(args.epochs * len(everything) / args.batch_unlabeled) if args.epochs else DEFAULT_ITERS
    if common.is_main_process():
        common.write_ids(os.path.join(args.out, "labeled.txt"), labeled)
        common.write_ids(os.path.join(args.out, "unlabeled.txt"), unlabeled)
    print(f"{description.name}: {len(labeled)} labelled images, {len(everything)} with pseudo-masks from {args.pseudo}, "
          f"{len(class_names)} classes; {args.iters} steps of {args.batch_labeled} + {args.batch_unlabeled} on {device}"
          + (f" ({args.world_size} processes)" if args.distributed else "") + f", auxiliary head: {args.aux_head}")

    student = common.build_model(args.backbone, len(class_names), "none" if args.init else args.weights,
                                 aux_head=args.aux_head)
    if args.init and checkpoint is None:
        load_init(student, args.init)
    optimizer, scheduler = common.make_optimizer(student, args)
    step = 0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        step = checkpoint["step"]
    net = common.prepare_model(student, args, device)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    decay = [ema_decay(step, args.iters, args.ema_decay)]
    teacher = make_teacher(student, decay)
    if checkpoint is not None:
        teacher.module.load_state_dict(checkpoint["teacher"])
        print(f"resuming {checkpoint_path} at step {step}")
    teacher_net = torch.compile(teacher) if args.compile else teacher

    weak = common.weak_augment(common.crop_of(args), common.train_scale_range(args))
    pseudo_files = {i: os.path.join(args.pseudo, f"{i}.png") for i in everything}
    labeled_set = LabeledWithPseudo(common.true_mask_dataset(description, labeled), args.pseudo, weak)
    pseudo_set = common.SegmentationDataset(everything, description.images, pseudo_files, len(class_names))
    labeled_batches = common.train_batches(labeled_set, args.batch_labeled, args.workers, args.seed, step)
    unlabeled_batches = common.train_batches(StrongViewDataset(pseudo_set, weak), args.batch_unlabeled, args.workers,
                                             args.seed + 1, step)
    val_loader = common.full_image_loader(common.val_dataset(description), 8, args.workers)

    def save(step):
        common.save_on_master(checkpoint_path, {
            "model": student.state_dict(), "teacher": teacher.module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "args": vars(args), "labeled": labeled,
            "unlabeled": unlabeled, "class_names": class_names, "dataset": description.name, "stage": 3})

    def validate():
        evaluate = common.evaluate
        main_head = evaluate(teacher.module, val_loader, device, len(class_names), args.amp, image_scale=args.image_scale)
        aux_head = evaluate(teacher.module, val_loader, device, len(class_names), args.amp, head=1, image_scale=args.image_scale)
        return main_head, aux_head

    history = common.History(args.out, step if checkpoint is not None else None)
    flops = step_flops(args, len(class_names)) // args.world_size if device.type == "cuda" else None
    progress = common.Progress(step, args.iters, flops, common.peak_flops(device, args.amp))
    while step < args.iters:
        labeled_batch = [common.to_device(x, device, args.channels_last) for x in next(labeled_batches)[:3]]
        unlabeled_batch = [common.to_device(x, device, args.channels_last) for x in next(unlabeled_batches)[:4]]
        terms = train_one_step(net, teacher_net, labeled_batch, unlabeled_batch, optimizer, scheduler, decay, args)
        progress.add(terms)
        step += 1
        if step % args.print_every == 0 or step == args.iters:
            text, record = progress.line(step, scheduler.get_last_lr()[0])
            common.check_finite(record, step)
            print(f"{text}  ema {decay[0]}", flush=True)
            history.append({**record, "ema_decay": decay[0]})
        if step % args.save_every == 0 or step == args.iters:
            common.check_finite({name: value.item() for name, value in terms.items()}, step)
            save(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.iters:
            main_head, aux_head = validate()
            print(f"step {step}: teacher val mIoU {main_head.miou():.2f} (auxiliary head {aux_head.miou():.2f})")
            history.append({"step": step, "val_miou": main_head.miou(), "aux_val_miou": aux_head.miou()})

    main_head, aux_head = validate()
    print(f"teacher's main head, val IoU after {step} steps:\n{main_head.table(class_names)}")
    print(f"teacher's auxiliary head ({args.aux_head}): val mIoU {aux_head.miou():.2f}")
    history.append({"step": step, "val_miou": main_head.miou(), "aux_val_miou": aux_head.miou()})
    if common.is_main_process():
        common.write_json(os.path.join(args.out, "metrics.json"), {
            "step": step, **main_head.report(class_names), "aux_miou": aux_head.miou()})


if __name__ == "__main__":
    common.run_main(main)
