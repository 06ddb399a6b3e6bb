"""run_pipeline.sh: the chain of the six commands (and the controls), printed as it runs; a rerun
skips finished steps and continues an interrupted one; a step made another way is refused by the
script that would overwrite it, never overwritten."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT

TINY = "--backbone tiny_unet --no-pretrained --crop-size 24 --iters 2 --workers 0 --device cpu"


def pipeline(data, out, *, extra=TINY, stage1_extra="--strong-aug --epochs 2", check=True, **env):
    """run_pipeline.sh DATA 4 OUT; every test's stage 1 has the finished run's flags (EXTRA's --iters wins)."""
    result = subprocess.run(["bash", os.path.join(ROOT, "run_pipeline.sh"), data, "4", out], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "EXTRA": extra, "STAGE1_EXTRA": stage1_extra, **env}, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def finished(voc_template, tmp_path_factory):
    """A finished pipeline, with both controls; its stage 1 with the strong augmentation."""
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    result = pipeline(voc_template, out, CONTROL="1")
    return voc_template, out, result.stdout


def copy_of(finished, tmp_path):
    return shutil.copytree(finished[1], str(tmp_path / "run"))


def commands(stdout):
    """The commands the pipeline printed, as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_the_chain_prints_its_commands_and_writes_every_step(finished):
    voc_root, out, stdout = finished
    ran = commands(stdout)
    assert [c[1] for c in ran] == ["stage1_train.py", "stage2_pseudolabel.py", "stage3_multitask.py", "stage2_pseudolabel.py",
                                   "stage3_multitask.py", "stage2_pseudolabel.py", "stage1_train.py", "stage1_train.py",
                                   "evaluate.py"]
    assert ran[0][:8] == ["python", "stage1_train.py", "--data-root", voc_root, "--labeled", "4", "--split-seed", "0"]
    assert ran[2][ran[2].index("--pseudo") + 1] == f"{out}/pseudo1" and ran[2][ran[2].index("--aux-head") + 1] == "separate"
    previous = ran[5].index("--previous")
    assert ran[5][previous + 1:previous + 3] == [f"{out}/pseudo1", f"{out}/pseudo2"]
    for step, script in [("stage1", "stage1_train.py"), ("pseudo1", "stage2_pseudolabel.py"), ("stage2", "stage3_multitask.py"),
                         ("pseudo3", "stage2_pseudolabel.py"), ("control", "stage1_train.py"), ("control_strong", "stage1_train.py")]:
        assert json.load(open(os.path.join(out, step, "run.json")))["script"] == script
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["compare"]) == {"stage1", "control", "control_strong"}
    for name, r in summary["compare"].items():
        assert r["miou"] == pytest.approx(json.load(open(os.path.join(out, name, "metrics.json")))["miou"])
        assert r["gain"] == pytest.approx(summary["miou"] - r["miou"])
    assert os.path.getsize(os.path.join(out, "pseudo3", "preview.png")) > 1000
    assert "pseudo-masks of the unlabelled images" in stdout and f"{out}/pseudo3 (this round)" in stdout


def test_the_controls_are_as_long_as_the_three_stages_with_and_without_s(finished):
    _, out, _ = finished
    stage1, plain, strong = (json.load(open(os.path.join(out, s, "run.json")))["recipe"] for s in ["stage1", "control", "control_strong"])
    steps = sum(json.load(open(os.path.join(out, s, "metrics.json")))["step"] for s in ["stage1", "stage2", "stage3"])
    assert plain["iters"] == strong["iters"] == steps == 6
    assert stage1["strong_aug"] and not plain["strong_aug"] and strong["strong_aug"]


def test_a_rerun_skips_what_is_finished_and_continues_what_was_interrupted(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    os.remove(os.path.join(out, "stage3", "metrics.json"))  # as if stopped after its last checkpoint, before its end
    # Running flags (workers, printing) are not part of a recipe.
    stdout = pipeline(finished[0], out, extra=TINY.replace("--workers 0", "--workers 1") + " --print-every 7").stdout
    for step in ["stage1", "stage2"]:
        assert f"{os.path.join(out, step)} holds this run, finished (metrics.json): nothing to do" in stdout
    assert f"continuing the run in {os.path.join(out, 'stage3')} from step 2" in stdout
    for step in ["pseudo1", "pseudo2", "pseudo3"]:  # finished, and left exactly as they are
        assert f"{os.path.join(out, step)} holds these pseudo-masks, finished (stats.json): nothing to do" in stdout


def test_a_step_made_another_way_stops_the_rerun_and_is_not_overwritten(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = open(os.path.join(out, "stage1", "checkpoint.pt"), "rb").read()
    result = pipeline(finished[0], out, extra=TINY.replace("--iters 2", "--iters 3"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {out}/stage1 was made with --iters 2, this command asks for --iters 3; "
                                     "use another --out, or the run's flags (or --resume) to continue it")
    assert open(os.path.join(out, "stage1", "checkpoint.pt"), "rb").read() == before
    result = pipeline(finished[0], out, stage1_extra="--epochs 2", check=False)
    assert result.stderr.strip().startswith(f"error: {out}/stage1 was made with --strong-aug True, this command asks for "
                                            "--strong-aug False;")


def test_a_step_made_outside_the_pipeline_is_not_taken_over(voc_template, tmp_path):
    out = tmp_path / "run"
    (out / "stage1").mkdir(parents=True)
    (out / "stage1" / "checkpoint.pt").write_bytes(b"someone else's")
    result = pipeline(voc_template, str(out), check=False)
    assert result.returncode != 0 and "holds files that stage1_train.py did not write (checkpoint.pt" in result.stderr
    assert (out / "stage1" / "checkpoint.pt").read_bytes() == b"someone else's"


def test_the_chain_runs_on_your_own_data(tmp_path):
    data = str(tmp_path / "mydata")
    subprocess.run(["python", "make_demo_data.py", "--layout", "folder", "--out", data, "--train", "12", "--train-txt", "6",
                    "--val", "3", "--size", "24"], cwd=ROOT, check=True, capture_output=True)
    result = pipeline(data, str(tmp_path / "run"), stage1_extra="--batch-size 2")
    assert result.stdout.splitlines()[1].startswith(f"folder data in {data}: 12 training images (6 with a mask, 6 without), "
                                                    "3 val images")
    assert json.load(open(tmp_path / "run" / "summary.json"))["compare"]["stage1"]["miou"] >= 0


def test_the_next_labelling_round_is_one_command(finished, tmp_path):
    """LABEL_NEXT: the labelled images of a round of pseudo-masks and the first LABELED images of its
    label_next.csv (the tiny tree's all have masks), the whole method again, into the run's folder + _next."""
    voc_root, _, _ = finished
    run = copy_of(finished, tmp_path)
    result = subprocess.run(["bash", os.path.join(ROOT, "run_pipeline.sh"), voc_root, "2"], capture_output=True,
                            text=True, cwd=ROOT, timeout=900, env={**os.environ, "EXTRA": TINY, "LABEL_NEXT":
                                                                   f"{run}/pseudo3", "STAGE1_EXTRA": "--epochs 2"})
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout)[0][2:7] == ["--data-root", voc_root, "--add-labeled", f"{run}/pseudo3", "2"]
    before = open(os.path.join(run, "stage1", "labeled.txt")).read().split()
    added = [line.split(",")[1] for line in open(os.path.join(run, "pseudo3", "label_next.csv")).read().split()[1:3]]
    after = open(f"{run}_next/stage1/labeled.txt").read().split()
    assert after == sorted(before + added) and os.path.exists(f"{run}_next/summary.json")
    assert open(f"{run}_next/pseudo3/labeled_rounds.csv").read().count(",2\n") == 2


def test_help_and_bad_arguments():
    result = subprocess.run(["bash", os.path.join(ROOT, "run_pipeline.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "CONTROL=1" in result.stdout and result.stdout.startswith("The whole method")
    result = subprocess.run(["bash", os.path.join(ROOT, "run_pipeline.sh"), "only-one"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: give no arguments (the demo) or DATA_ROOT LABELED")
