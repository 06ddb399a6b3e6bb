"""stage3_multitask.py: the loss terms of the authors' step, the strong augmentation and its warp,
the EMA teacher, both head layouts, errors."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import training
import outputs
import stage3_multitask
from conftest import TINY_TRAIN, TRAIN_IDS, assert_user_error, run_script

TINY_MULTITASK = ["--backbone", "tiny_unet", "--no-pretrained", "--crop-size", "24", "--batch-labeled", "1",
                  "--batch-unlabeled", "2", "--iters", "2", "--workers", "0", "--device", "cpu", "--print-every", "1"]


@pytest.fixture(scope="module")
def pseudo_dir(tmp_path_factory, voc_template):
    """A stage-1 checkpoint and its pseudo-masks."""
    base = tmp_path_factory.mktemp("multitask")
    run_script("stage1_train.py", "--data-root", voc_template, "--labeled", 4, *TINY_TRAIN, "--out", base / "stage1")
    run_script("stage2_pseudolabel.py", "--checkpoint", base / "stage1" / "checkpoint.pt", "--out", base / "pseudo",
               "--workers", 0)
    return voc_template, str(base / "pseudo"), str(base / "stage1" / "checkpoint.pt")


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_both_head_layouts_train_and_evaluate_with_the_teacher(pseudo_dir, tmp_path, aux_head):
    voc_root, pseudo, _ = pseudo_dir
    out = str(tmp_path / "stage")
    result = run_script("stage3_multitask.py", "--pseudo", pseudo, "--aux-head", aux_head, *TINY_MULTITASK, "--out", out)
    assert "L_sup" in result.stdout and "L_con" in result.stdout and "L_aux" in result.stdout
    assert f"teacher's auxiliary head ({aux_head})" in result.stdout
    checkpoint, _ = outputs.load_checkpoint(out)
    assert checkpoint["step"] == 2 and checkpoint["args"]["aux_head"] == aux_head
    assert any(k.startswith("aux_last_stage.") for k in checkpoint["teacher"]) == (aux_head == "separate")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"miou", "per_class", "aux_miou"} <= set(metrics)
    result = run_script("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--workers", 0)
    assert "(teacher, step 2)" in result.stdout
    # The same --labeled and --split-seed give the same split as stage 1.
    assert open(os.path.join(out, "labeled.txt")).read() == open(os.path.join(os.path.dirname(pseudo), "stage1", "labeled.txt")).read()


def test_init_from_a_stage1_checkpoint(pseudo_dir, tmp_path):
    voc_root, pseudo, stage1 = pseudo_dir
    out = str(tmp_path / "stage")
    run_script("stage3_multitask.py", "--data-root", voc_root, "--pseudo", pseudo, *TINY_MULTITASK,
               "--iters", 1, "--init", stage1, "--out", out, "--lr", 1e-9)
    student = outputs.load_checkpoint(out)[0]["model"]
    initial = outputs.load_checkpoint(stage1)[0]["model"]
    for key, value in initial.items():  # barely moved from the initial weights (lr 1e-9)
        if value.is_floating_point() and "running" not in key:
            assert torch.allclose(student[key], value, atol=1e-6), key
    # ĝ's own last stage starts fresh (half as wide), not as a copy of the main one.
    assert student["aux_last_stage.block.0.weight"].shape[0] == initial["last_stage.block.0.weight"].shape[0] // 2


def test_init_from_a_multitask_checkpoint_takes_its_teacher_and_not_its_aux_head(pseudo_dir, tmp_path):
    voc_root, pseudo, _ = pseudo_dir
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    run_script("stage3_multitask.py", "--pseudo", pseudo, *TINY_MULTITASK, "--aux-head", "separate", "--out", first)
    run_script("stage3_multitask.py", "--pseudo", pseudo, *TINY_MULTITASK, "--aux-head", "shared", "--iters", 1,
               "--lr", 1e-9, "--init", first, "--out", second)  # a run folder stands for its checkpoint
    teacher = outputs.load_checkpoint(first)[0]["teacher"]
    student = outputs.load_checkpoint(second)[0]["model"]
    assert not any(k.startswith("aux_last_stage.") for k in student)
    for key, value in teacher.items():
        if value.is_floating_point() and "running" not in key and not key.startswith("aux"):
            assert torch.allclose(student[key], value, atol=1e-6), key


def test_init_of_another_backbone_names_both(pseudo_dir, tmp_path):
    _, pseudo, stage1 = pseudo_dir
    result = run_script("stage3_multitask.py", "--pseudo", pseudo, *TINY_MULTITASK, "--backbone", "resnet50",
                        "--batch-unlabeled", 3, "--init", stage1, "--out", tmp_path / "stage", check=False)
    assert_user_error(result, f"--init {stage1} is a tiny_unet model of 21 classes; this run is a resnet50 model of 21 classes")
    assert not os.path.exists(tmp_path / "stage")  # refused before anything was written


def test_missing_pseudo_masks_are_counted_and_a_folder_of_pngs_is_not_taken(pseudo_dir, tmp_path):
    voc_root, pseudo, _ = pseudo_dir
    partial = shutil.copytree(pseudo, tmp_path / "partial")
    for image_id in TRAIN_IDS[:3]:
        os.remove(partial / "masks" / f"{image_id}.png")
    result = run_script("stage3_multitask.py", "--pseudo", partial, *TINY_MULTITASK, "--out", tmp_path / "stage", check=False)
    assert_user_error(result, f"is unfinished (3 of {len(TRAIN_IDS)} pseudo-masks missing)", "stage2_pseudolabel.py")
    assert not os.path.exists(tmp_path / "stage" / "checkpoint.pt")
    os.remove(partial / "run.json")  # PNGs of unknown origin: which data, which split?
    result = run_script("stage3_multitask.py", "--pseudo", partial, "--data-root", voc_root, *TINY_MULTITASK,
                        "--out", tmp_path / "stage", check=False)
    assert_user_error(result, f"--pseudo {partial} holds no outputs of stage2_pseudolabel.py")


def make_batch(seed, n_l=2, n_u=3, size=16, classes=3):
    """A labelled batch (x_l, y_l, p_l) and an unlabelled one (x_weak, x_strong, p_strong, source),
    with a source map that mirrors and drops a border (-1), as S's warp could."""
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(n_l, 3, size, size, generator=g)
    y_l = torch.randint(0, classes, (n_l, size, size), generator=g)
    p_l = torch.randint(0, classes, (n_l, size, size), generator=g)
    x_weak = torch.randn(n_u, 3, size, size, generator=g)
    x_strong = torch.randn(n_u, 3, size, size, generator=g)
    p_strong = torch.randint(0, classes, (n_u, size, size), generator=g)
    source = torch.arange(size * size).view(size, size).flip(-1).repeat(n_u, 1, 1)
    source[:, :, :2] = -1
    return (x_l, y_l, p_l), (x_weak, x_strong, p_strong, source)


def make_pair(aux_head="shared"):
    torch.manual_seed(0)
    student = common.build_model("tiny_unet", 3, weights="none", aux_head=aux_head).train()
    return student, stage3_multitask.make_teacher(student)[0]


def gradients(student):
    return {name: (None if p.grad is None else p.grad.clone()) for name, p in student.named_parameters()}


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_loss_terms_are_those_of_the_authors_step(aux_head):
    """The teacher sees the weak views [x_l, x_u]; the student [x_l, S(x_u)]; L_sup on the
    labelled images; L_con and L_aux over the whole batch, the labelled images included."""
    student, teacher = make_pair(aux_head)
    labeled, unlabeled = make_batch(0)
    terms = stage3_multitask.losses(student, teacher, labeled, unlabeled, 1.0, 0.5, False)
    (x_l, y_l, p_l), (x_weak, x_strong, p_strong, source) = labeled, unlabeled
    with torch.no_grad():
        t = teacher.eval()(torch.cat([x_l, x_weak])).argmax(1)
        t_u = t[2:].flatten(1).gather(1, source.clamp(min=0).flatten(1)).view_as(source)
        t_u[source < 0] = 255  # what came from outside the weak view has no target
        target = torch.cat([t[:2], t_u])
        main, aux = student(torch.cat([x_l, x_strong]), with_aux=True)
    assert (target == 255).sum() == 3 * 16 * 2
    assert terms["L_sup"].item() == pytest.approx(F.cross_entropy(main[:2], y_l).item(), rel=1e-5)
    assert terms["L_con"].item() == pytest.approx(F.cross_entropy(main, target, ignore_index=255).item(), rel=1e-5)
    assert terms["L_aux"].item() == pytest.approx(F.cross_entropy(aux, torch.cat([p_l, p_strong])).item(), rel=1e-5)
    expected = 1.0 * terms["L_sup"] + 0.5 * (terms["L_con"] + terms["L_aux"]) / 2
    assert terms["L"].item() == pytest.approx(expected.item())


def test_w_con_zero_gives_the_auxiliary_head_no_gradient():
    student, teacher = make_pair("separate")
    labeled, unlabeled = make_batch(1)
    stage3_multitask.losses(student, teacher, labeled, unlabeled, 1.0, 0.0, False)["L"].backward()
    grads = gradients(student)
    aux = [name for name in grads if name.startswith(("aux_head.", "aux_last_stage."))]
    assert aux and all(grads[name] is None for name in aux)
    assert all(grads[name] is not None for name in grads if name.startswith("head."))


def test_w_sup_zero_the_true_masks_play_no_part():
    results = []
    for seed in [2, 3]:  # different true masks y_l, everything else the same
        student, teacher = make_pair()
        labeled, unlabeled = make_batch(99)
        labeled = (labeled[0], make_batch(seed)[0][1], labeled[2])
        terms = stage3_multitask.losses(student, teacher, labeled, unlabeled, 0.0, 0.5, False)
        terms["L"].backward()
        results.append((terms["L"].item(), gradients(student)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_ema_update_matches_its_formula():
    student, _ = make_pair()
    teacher, update_teacher = stage3_multitask.make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # starts as a copy
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(2, 3, 16, 16))  # moves the BN running statistics too
    update_teacher(0.9)
    after = teacher.state_dict()
    for key, value in student.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(after[key], 0.9 * before[key] + 0.1 * value, atol=1e-6), key
        else:
            assert torch.equal(after[key], value), key  # BN's batch counters are copied


def test_the_teacher_is_the_one_torchs_averaged_model_gave_to_the_bit():
    """The two-operation update gives what the version before gave with torch.optim.swa_utils.AveragedModel."""
    student, _ = make_pair("separate")
    teacher, update_teacher = stage3_multitask.make_teacher(student)
    averaged = torch.optim.swa_utils.AveragedModel(student, use_buffers=True, multi_avg_fn=lambda t, s, n: (
        torch._foreach_lerp_(t, s, 0.1) if t[0].is_floating_point() else [a.copy_(b) for a, b in zip(t, s)]))
    averaged.update_parameters(student)  # its first update copies, as the version before made its teacher
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student(torch.randn(2, 3, 16, 16))
        update_teacher(0.9)
        averaged.update_parameters(student)
    for key, value in averaged.module.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_ema_decay_schedule():
    decays = [stage3_multitask.ema_decay(step, 600) for step in [0, 199, 200, 399, 400, 499, 500, 600]]
    assert decays == [0.99, 0.99, 0.995, 0.995, 0.9975, 0.9975, 0.999, 0.999]
    assert stage3_multitask.ema_decay(10, 600, constant=0.9) == 0.9


def colour_classes(image):
    """A 'teacher' whose prediction at a pixel is a function of that pixel's colour alone."""
    image = image.long()
    return (image[0] + 3 * image[1] + 7 * image[2]) % 5


def test_strong_augment_geometry_moves_the_targets_exactly(monkeypatch):
    """With geometric operations only: the teacher's prediction on the weak view, carried through
    the warp, is exactly its own prediction on the strong view wherever the target is not 255."""
    monkeypatch.setattr(training, "STRONG_OPERATIONS", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"])
    monkeypatch.setattr(training.random, "random", lambda: 0.0)  # every drawn operation applied
    common.random.seed(0)
    moved_somewhere = 0
    for trial in range(20):
        image = common.tv_tensors.Image(torch.randint(0, 256, (3, 41, 53), dtype=torch.uint8))
        strong, source = training.strong_augment(image, cutouts=0)
        warped = training.warp(colour_classes(image), source)
        kept = warped != common.IGNORE
        assert torch.equal(warped[kept], colour_classes(strong)[kept])
        assert (strong[:, ~kept] == training.GREY).all()  # from outside the image: grey, and no target
        moved_somewhere += int(not torch.equal(source, torch.arange(41 * 53).view(41, 53)))
    assert moved_somewhere >= 18


def test_strong_augment_draws_three_of_the_fourteen_operations_and_cutout():
    assert len(training.STRONG_OPERATIONS) == 14
    common.random.seed(1)
    image = common.tv_tensors.Image(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8))
    outputs = [training.strong_augment(image) for _ in range(30)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o, _ in outputs)
    assert all(s.shape == (64, 64) and s.dtype == torch.int64 for _, s in outputs)
    assert all((o == training.GREY).all(0).sum() >= 32 for o, _ in outputs)  # Cutout: 3 grey squares of 6x6 here
    assert any(torch.equal(s, torch.arange(64 * 64).view(64, 64)) for _, s in outputs)  # photometric only, sometimes
    assert any(not torch.equal(s, torch.arange(64 * 64).view(64, 64)) for _, s in outputs)


def test_strong_view_dataset_moves_the_mask_with_the_image(voc_template):
    # The true masks stand in for pseudo-masks here: they have several classes and a 255 border.
    images = common.SegmentationDataset(common.describe_dataset(voc_template), TRAIN_IDS)
    dataset = stage3_multitask.StrongViewDataset(images, training.weak_augment((24, 24), (1.0, 1.0)))
    for index in range(len(TRAIN_IDS)):
        common.random.seed(index)
        torch.manual_seed(index)
        x_weak, x_strong, p_strong, source, _ = dataset[index]
        common.random.seed(index)
        torch.manual_seed(index)
        _, p_weak = training.weak_augment((24, 24), (1.0, 1.0))(*images.load(index))
        assert len(p_weak.unique()) > 2
        assert torch.equal(p_strong, training.warp(p_weak.long(), source))
