"""Several processes through torchrun (two CPU processes, gloo): training, resume, evaluation and
pseudo-labelling split across processes give what one process gives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import outputs
from conftest import ROOT, TINY_TRAIN, TRAIN_IDS, run_script


def torchrun(script, *args, processes=2):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(processes), os.path.join(ROOT, script), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def two_process_run(voc_template, tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    out = str(base / "stage1")
    result = torchrun("stage1_train.py", "--data-root", voc_template, "--labeled", 4, *TINY_TRAIN, "--iters", 3,
                      "--save-every", 2, "--out", out)
    return voc_template, base, out, result


def test_training_with_two_processes_prints_once_and_evaluates_like_one_process(two_process_run, tmp_path):
    _, _, out, result = two_process_run
    assert result.stdout.count("step 3/3") == 1 and "(2 processes)" in result.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))  # counts gathered from both processes
    report = str(tmp_path / "one.json")
    run_script("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--workers", 0, "--json", report)
    assert json.load(open(report))["miou"] == pytest.approx(metrics["miou"])
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "history.jsonl")) if "loss" in line] == [1, 2, 3]


def test_pseudo_labels_with_two_processes_are_those_of_one(two_process_run):
    _, base, out, _ = two_process_run
    checkpoint = os.path.join(out, "checkpoint.pt")
    torchrun("stage2_pseudolabel.py", "--checkpoint", checkpoint, "--out", base / "two", "--workers", 0, "--device", "cpu")
    run_script("stage2_pseudolabel.py", "--checkpoint", checkpoint, "--out", base / "one", "--workers", 0, "--device", "cpu")
    for image_id in TRAIN_IDS:
        assert np.array_equal(np.array(Image.open(base / "two" / "masks" / f"{image_id}.png")),
                              np.array(Image.open(base / "one" / "masks" / f"{image_id}.png")))
    two, one = (json.load(open(base / name / "stats.json")) for name in ["two", "one"])
    assert two["unlabeled"]["miou"] == pytest.approx(one["unlabeled"]["miou"])


def test_multitask_with_two_processes_and_resume(two_process_run):
    _, base, out, _ = two_process_run
    run_script("stage2_pseudolabel.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", base / "pseudo",
               "--workers", 0, "--device", "cpu")
    stage = str(base / "stage2")
    flags = ["--backbone", "tiny_unet", "--no-pretrained", "--crop-size", 24,
             "--batch-labeled", 2, "--batch-unlabeled", 2, "--workers", 0, "--device", "cpu", "--print-every", 1,
             "--pseudo", base / "pseudo"]
    torchrun("stage3_multitask.py", *flags, "--iters", 4, "--save-every", 2, "--out", stage)
    checkpoint, path = outputs.load_checkpoint(stage)
    assert checkpoint["step"] == 4 and not any(k.startswith("module.") for k in checkpoint["model"])
    # Resume under torchrun from a step-2 checkpoint.
    checkpoint["step"], checkpoint["scheduler"]["last_epoch"] = 2, 2
    torch.save(checkpoint, path)
    os.remove(os.path.join(stage, "metrics.json"))
    result = torchrun("stage3_multitask.py", "--resume", "--out", stage, "--workers", 0, "--device", "cpu", "--print-every", 1)
    assert f"continuing the run in {stage} from step 2" in result.stdout
    assert "step 3/4" in result.stdout and "step 1/4" not in result.stdout


def test_a_batch_that_processes_cannot_share_is_one_line(voc_template, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             os.path.join(ROOT, "stage1_train.py"), "--data-root", voc_template, "--labeled", "4",
                             *TINY_TRAIN, "--batch-size", "3", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0
    assert "error: a batch of 3 images cannot be shared by 2 processes" in result.stderr
