"""The multi-task mean-teacher training of Ke et al. (IEEE TIP 2022): the paper's stage 2 (--aux-head separate)
and stage 3 (--aux-head shared).

    python stage3_multitask.py --pseudo runs/pseudo1 --aux-head separate --out runs/stage2    # paper stage 2
    python stage3_multitask.py --pseudo runs/pseudo2 --aux-head shared --out runs/stage3      # paper stage 3

It trains on the split and the data of its pseudo-masks (stage2_pseudolabel.py's --out, which took them from the
checkpoint that made the masks). A student and its EMA teacher, as in the authors' training step. Each step takes
labelled images x_l (true masks y_l) and images of the whole training set x_u (labelled ones too), each with its
pseudo-mask p. All get the weak view (scale, crop, flip); x_u also gets the strong augmentation S (3 of
RandAugment's 14 operations and Cutout), whose geometric operations move p and the teacher's target with the image.
The teacher sees the weak views [x_l, x_u]; its argmax t is carried through S's warp. The student sees [x_l, S(x_u)].
With CE the cross-entropy ignoring 255, over the whole batch where not said otherwise:
    L_sup = CE(g(x_l), y_l)      L_con = CE(g([x_l, S(x_u)]), t)      L_aux = CE(aux([x_l, S(x_u)]), p)
    L = w_sup * L_sup + w_con * (L_con + L_aux) / 2
After every optimiser step the teacher moves toward the student: teacher = decay * teacher + (1 - decay) * student,
over every weight and batch-norm statistic, with the decay 0.99, 0.995, 0.9975, 0.999 after 0, 1/3, 2/3, 5/6 of
training. The auxiliary head is ĝ (--aux-head separate, paper stage 2: a new last backbone stage of its own, half
as wide, fed by the stage before) or g̃ (shared, paper stage 3: a second head on the shared last stage). The
teacher's main head is the model that evaluate.py and stage2_pseudolabel.py use.

Writes to --out what stage1_train.py writes (checkpoint.pt also holds the teacher and the paper's stage; metrics.json
also the auxiliary head's val mIoU). The same command again continues an interrupted run, to the same weights as a
run never stopped (on the CPU). The training flags below, the augmentation (the weak view, S and its warp), the
progress lines and the validation are those of stage 1 (training.py, which both use); the data, the losses, the
teacher and the step are this file's.
"""
import os
import signal

# A Ctrl-C or SIGTERM while the imports below run (seconds) ends the command in one line. Nothing is written yet, so
# it quits at once: an exception raised in the middle of numpy's import would come back as another error's traceback.
if __name__ == "__main__":  # imported (by the tests, benchmark.py), a module leaves the importer's signals alone
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (os.write(2, b"interrupted while starting: nothing was done\n"), os._exit(1)))

import argparse
import copy
import math

import torch
import torch.nn.functional as F

import common
import outputs
import training
from common import UserError

DEFAULT_ITERS = 60_000  # the authors' length of each multi-task stage, on VOC and on Cityscapes
PSEUDO_SCRIPT = "stage2_pseudolabel.py"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    method = parser.add_argument_group("multi-task mean teacher")
    method.add_argument("--pseudo", help="the pseudo-masks of the previous round (stage2_pseudolabel.py's --out), "
                                         "with their split; required but with --resume")
    method.add_argument("--data-root", help="the dataset's folder (default: the one the pseudo-masks were made on)")
    method.add_argument("--aux-head", choices=["separate", "shared"], default="separate",
                        help="separate: ĝ with a new, half-width last backbone stage of its own (paper stage 2); "
                             "shared: g̃ on the shared last stage (paper stage 3) (default: %(default)s)")
    method.add_argument("--batch-labeled", type=int, default=1,
                        help="labelled images a step, over all processes (default: %(default)s)")
    method.add_argument("--batch-unlabeled", type=int, default=9,
                        help="images of the whole training set a step (default: %(default)s, the authors' 1 + 9 "
                             "on VOC)")
    method.add_argument("--w-sup", type=float, default=1.0,
                        help="weight of L_sup (default: %(default)s; 0.5 on Cityscapes)")
    method.add_argument("--w-con", type=float, default=0.5,
                        help="weight of (L_con + L_aux) / 2 (default: %(default)s)")
    method.add_argument("--ema-decay", type=float,
                        help="a constant teacher decay (default: 0.99, 0.995, 0.9975, 0.999 after 0, 1/3, 2/3, 5/6 of "
                             "training)")
    method.add_argument("--init", help="start from this checkpoint's weights (its teacher's, if it has one) instead "
                                       "of --weights; the auxiliary head and ĝ's stage start fresh")
    training.add_training_args(parser, f"{DEFAULT_ITERS:,}, the authors'")
    return parser


def inputs(args):
    """What the run's input folders hold, wherever they lie (a run folder may move): the checkpoint its
    pseudo-masks were made from, and --init's checkpoint, by their SHA-256."""
    init = os.path.join(args.init, "checkpoint.pt") if args.init and os.path.isdir(args.init) else args.init
    return {"pseudo": outputs.read_record(args.pseudo, "--pseudo", PSEUDO_SCRIPT)["recipe"]["checkpoint"],
            "init": outputs.fingerprint(init) if init and os.path.isfile(init) else args.init}


def pseudo_split(folder, record, description):
    """The split the pseudo-masks were made for, checked against the data this run trains on: the same dataset,
    and a finished pseudo-mask for every training image."""
    if os.path.realpath(description.root) != record["recipe"]["data_root"]:
        raise UserError(f"--pseudo {folder} was made on the data in {record['recipe']['data_root']}, not on "
                        f"--data-root {description.root}; make pseudo-masks of this data with {PSEUDO_SCRIPT}")
    if not os.path.isdir(os.path.join(folder, "masks")):
        raise UserError(f"--pseudo {folder} was written by an earlier version (no masks/ folder); make it again")
    labeled, unlabeled = (common.read_lines(os.path.join(folder, f"{name}.txt")) for name in ["labeled", "unlabeled"])
    missing = [i for i in labeled + unlabeled if not os.path.exists(outputs.pseudo_mask_path(folder, i))]
    if missing or not os.path.exists(os.path.join(folder, "stats.json")):
        raise UserError(f"--pseudo {folder} is unfinished ({len(missing)} of {len(labeled + unlabeled)} "
                        f"pseudo-masks missing); run the {PSEUDO_SCRIPT} command that made it again to "
                        "finish it")
    return sorted(labeled), sorted(unlabeled)


def check_init(checkpoint, path, backbone, description):
    """--init, before anything is written: a model of this run's backbone and classes, not trained on val images."""
    if checkpoint["args"]["backbone"] != backbone:
        raise UserError(f"--init {path} is a {checkpoint['args']['backbone']} model of "
                        f"{len(checkpoint['class_names'])} classes; this run is a {backbone} model of "
                        f"{len(description.class_names)} classes")
    common.check_checkpoint_fits(checkpoint, path, description)


def load_init(student, checkpoint, path):
    """Start from another checkpoint's weights (its mean teacher's, where it has one). The auxiliary head and ĝ's
    own stage start fresh, as they do from ImageNet weights."""
    new = ("aux_head.", "aux_last_stage.")
    weights = {k: v for k, v in common.final_weights(checkpoint).items() if not k.startswith(new)}
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError:
        missing, unexpected = ["(shapes differ)"], []
    if unexpected or any(not key.startswith(new) for key in missing):  # check_init has passed: another version's
        raise UserError(f"--init {path}: its weights do not fit this run's model (first: {(unexpected + missing)[0]}); "
                        "train the run it comes from again with this version")


# ============================================================================= the mean teacher

def make_teacher(student):
    """The mean teacher: a copy of the student that no optimiser touches, and the update that moves it toward the
    student, teacher = decay * teacher + (1 - decay) * student, over every weight and batch-norm statistic (the
    integer counters of batch norm are copied). The tensor lists are made once: the update is two operations."""
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    pairs = list(zip(teacher.state_dict().values(), student.state_dict().values()))  # tensors sharing the weights
    teacher_floats, student_floats = ([pair[i] for pair in pairs if pair[0].is_floating_point()] for i in (0, 1))
    teacher_counts, student_counts = ([pair[i] for pair in pairs if not pair[0].is_floating_point()] for i in (0, 1))

    @torch.no_grad()
    def update_teacher(decay):
        torch._foreach_lerp_(teacher_floats, student_floats, 1 - decay)  # t + (1 - decay) * (s - t)
        if teacher_counts:
            torch._foreach_copy_(teacher_counts, student_counts)
    return teacher, update_teacher


def ema_decay(step, iters, constant=None):
    """The authors' teacher decay by share of training done, unless a constant decay is given."""
    if constant is not None:
        return constant
    done = step / iters
    return 0.99 if done < 1 / 3 else 0.995 if done < 2 / 3 else 0.9975 if done < 5 / 6 else 0.999


# ============================================================================= data

class LabeledWithPseudo(torch.utils.data.Dataset):
    """Labelled images with their true mask and their own pseudo-mask, under one weak view: (x_l, y_l, p_l, index)."""

    def __init__(self, images, pseudo_dir, weak):
        self.images, self.pseudo_dir, self.weak = images, pseudo_dir, weak

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, mask = self.images.load(index)
        pseudo = common.read_mask(outputs.pseudo_mask_path(self.pseudo_dir, self.images.ids[index]),
                                  len(self.images.description.class_names), image.shape[-2:])
        image, mask, pseudo = self.weak(image, mask, pseudo)
        return (image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long(),
                pseudo.as_subclass(torch.Tensor).long(), index)


class StrongViewDataset(torch.utils.data.Dataset):
    """Images with their pseudo-masks: (weak view, S of it, the pseudo-mask moved by S, S's source map, index)."""

    def __init__(self, images, weak):
        self.images, self.weak = images, weak

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, pseudo = self.weak(*self.images.load(index))
        strong, source = training.strong_augment(image)
        return (image.as_subclass(torch.Tensor), strong.as_subclass(torch.Tensor),
                training.warp(pseudo, source).long(), source, index)


# ============================================================================= the step

def losses(student, teacher, labeled_batch, unlabeled_batch, w_sup, w_con, amp):
    """L_sup, L_con, L_aux and the total L of one step, as the authors' step computes them.

    labeled_batch: (x_l, y_l, p_l); unlabeled_batch: (x_weak, x_strong, p_strong, source). A term whose weight is 0
    is not computed: with w_con = 0 neither the teacher nor the auxiliary head runs, and the student sees x_l
    alone; with w_sup = 0 the true masks y_l play no part."""
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
    target = torch.cat([teacher_argmax[:n_l], training.warp(teacher_argmax[n_l:], source)])
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


def train_one_step(student, teacher, update_teacher, labeled_batch, unlabeled_batch, optimizer, scheduler, args):
    """One optimiser step of the student, then the teacher's EMA update; returns the losses (on the device) and the
    decay used."""
    student.train()
    terms = losses(student, teacher, labeled_batch, unlabeled_batch, args.w_sup, args.w_con, args.amp)
    optimizer.zero_grad(set_to_none=True)
    terms["L"].backward()
    optimizer.step()
    scheduler.step()
    decay = ema_decay(scheduler.last_epoch, args.iters, args.ema_decay)  # last_epoch: the steps done
    update_teacher(decay)
    return terms, decay


def main(argv=None):
    args = training.parse_args(get_args_parser(), argv, "stage3_multitask.py")
    if args.pseudo is None:
        raise UserError(f"give --pseudo DIR, the pseudo-masks of the previous round ({PSEUDO_SCRIPT}'s --out)")
    if not (args.ema_decay or 0) < 1 or not args.w_sup + args.w_con > 0:
        raise UserError("--ema-decay must be below 1, and --w-sup and --w-con not both 0")
    pseudo = outputs.read_record(args.pseudo, "--pseudo", PSEUDO_SCRIPT)
    args.data_root = args.data_root or pseudo["recipe"]["data_root"]  # default: the data the masks were made on
    training.check_batch(args, args.batch_labeled + (args.batch_unlabeled if args.w_con else 0),
                         "--batch-labeled + --batch-unlabeled")
    init = None  # --init's (checkpoint, path): loaded and checked before anything is written, where a new run uses it

    def split(description, checkpoint):
        """The split of the pseudo-masks (a continued run's too), with its labelling rounds."""
        nonlocal init
        if args.init and checkpoint is None:
            init = outputs.load_checkpoint(args.init, "--init")
            check_init(*init, args.backbone, description)
        return (*pseudo_split(args.pseudo, pseudo, description), outputs.read_rounds(args.pseudo))
    run = training.start_run(args, "stage3_multitask.py", split, reads=[args.pseudo, args.init], inputs=inputs,
                             val_from=args.pseudo)
    if run is None:
        return
    args, description, device, checkpoint, (labeled, unlabeled, rounds) = run
    torch.manual_seed(args.seed)
    everything = sorted(labeled + unlabeled)  # the unlabelled stream: the whole training set
    if args.iters is None:
        args.iters = math.ceil(args.epochs * len(everything) / args.batch_unlabeled) if args.epochs else DEFAULT_ITERS
    paper_stage = 2 if args.aux_head == "separate" else 3
    print(f"the paper's stage {paper_stage} (auxiliary head: {args.aux_head}), on the pseudo-masks of "
          f"{pseudo['checkpoint']} (step {pseudo['step']}); {args.iters} steps of {args.batch_labeled} + "
          f"{args.batch_unlabeled} on {device}" + (f" ({args.world_size} processes)" if args.distributed else ""))
    class_names = description.class_names
    student = common.build_model(args.backbone, len(class_names), "none" if args.init else args.weights,
                                 aux_head=args.aux_head)
    if init:
        load_init(student, *init)
        init = None  # its weights are the student's now: its memory is freed
    optimizer, scheduler = training.make_optimizer(student, args)
    student = training.prepare_model(student, args, device, find_unused_parameters=args.w_con == 0)  # no aux head
    teacher, update_teacher = make_teacher(training.unwrapped(student))
    step = training.restore(checkpoint, args.out, {"model": training.unwrapped(student), "teacher": teacher},
                            optimizer, scheduler)
    teacher = torch.compile(teacher) if args.compile else teacher

    weak = training.weak_augment((args.crop_size * 2)[:2], [args.image_scale * s for s in args.scale_range])
    pseudo_files = {i: outputs.pseudo_mask_path(args.pseudo, i) for i in everything}
    labeled_set = LabeledWithPseudo(common.SegmentationDataset(description, labeled), args.pseudo, weak)
    pseudo_set = StrongViewDataset(common.SegmentationDataset(description, everything, masks=pseudo_files), weak)
    labeled_batches = training.train_loader(labeled_set, args.batch_labeled, args.workers, args.seed, step,
                                            args.rank, args.world_size)
    unlabeled_batches = training.train_loader(pseudo_set, args.batch_unlabeled, args.workers, args.seed + 1, step,
                                              args.rank, args.world_size)
    val_loader = training.val_loader(description, args)

    def validate():
        """The teacher's main head and auxiliary head on val."""
        return training.validate(training.unwrapped(teacher), val_loader, args, device, len(class_names), (0, 1))

    def save(step):
        outputs.save_checkpoint(
            args.out, step, model=training.unwrapped(student).state_dict(),
            teacher=training.unwrapped(teacher).state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), args=vars(args), labeled=labeled, unlabeled=unlabeled,
            labeled_rounds=rounds, class_names=class_names, palette=description.palette, stage=paper_stage)

    progress = training.Progress(args.out, step, args.iters, args.print_every)
    while step < args.iters:
        x_l, y_l, p_l, _ = next(labeled_batches)
        x_weak, x_strong, p_strong, source, _ = next(unlabeled_batches)
        x_l, x_weak, x_strong = (common.images_to_device(x, device, args.channels_last)
                                 for x in (x_l, x_weak, x_strong))
        # non_blocking: a blocking copy to the GPU would first wait for all the work queued there
        y_l, p_l, p_strong, source = (t.to(device, non_blocking=True) for t in (y_l, p_l, p_strong, source))
        terms, decay = train_one_step(student, teacher, update_teacher, (x_l, y_l, p_l),
                                      (x_weak, x_strong, p_strong, source), optimizer, scheduler, args)
        step += 1
        progress.update(step, terms, scheduler.get_last_lr()[0], ema=decay)
        training.after_step(args, step, terms, save, validate, progress)
    training.final_report(args, step, validate(), progress, class_names)


if __name__ == "__main__":
    outputs.run_main(main)
