"""run_pipeline.sh: the whole chain, its summary and picture, skipping finished steps, resuming,
and never reusing or overwriting a step made by another recipe."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

TINY = "--backbone tiny_unet --no-pretrained --crop-size 24 --iters 2 --workers 0 --device cpu"


def pipeline(data, out, *, extra=TINY, stage1_extra="--strong-aug --epochs 2", here=ROOT, check=True, **env):
    """run_pipeline.sh DATA 4 OUT; every test's stage 1 has the finished run's flags (EXTRA's --iters wins)."""
    result = subprocess.run(["bash", os.path.join(here, "run_pipeline.sh"), data, "4", out], capture_output=True,
                            text=True, env={**os.environ, "EXTRA": extra, "STAGE1_EXTRA": stage1_extra, **env},
                            timeout=900)
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
    """A copy of the finished run that a test may change (recipes are relative to their folder)."""
    return shutil.copytree(finished[1], str(tmp_path / "run"))


def test_the_chain_writes_a_summary_a_picture_and_every_step(finished):
    voc_root, out, stdout = finished
    assert "done, skipped" not in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["val_miou"]) == {"stage1", "stage2", "stage3", "control", "control_strong"}
    assert set(summary["gain_over"]) == {"stage1", "control", "control_strong"}
    assert summary["gain_over"]["control"] == pytest.approx(summary["val_miou"]["stage3"] - summary["val_miou"]["control"])
    assert set(summary["pseudo_miou"]) == {"round1", "round2", "round3"}
    assert os.path.getsize(os.path.join(out, "rounds.png")) > 1000
    for step in ["stage1", "pseudo1", "stage2", "pseudo2", "stage3", "pseudo3", "control", "control_strong"]:
        assert os.path.exists(os.path.join(out, "recipes", f"{step}.json")), step
    stage1, plain, strong = (json.load(open(os.path.join(out, "recipes", f"{c}.json")))["flags"]
                             for c in ["stage1", "control", "control_strong"])
    # The controls run as long as the three stages together: the paper's stage 1 recipe (without S,
    # though the method's stage 1 had it), and the same with S.
    assert plain["--iters"] == strong["--iters"] == ["6"] and "--strong-aug" in stage1
    assert "--strong-aug" not in plain and "--strong-aug" in strong
    # Stage 1's own length is left out of the controls', which is the sum of the stages'.
    assert "--epochs" in stage1 and "--epochs" not in plain and "--epochs" not in strong


def test_a_rerun_skips_every_finished_step_and_resumes_an_interrupted_one(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    stdout = pipeline(finished[0], out).stdout
    for step in ["stage1", "pseudo1", "stage2", "pseudo2", "stage3", "pseudo3"]:
        assert f"{os.path.join(out, step)}: done, skipped" in stdout
    os.remove(os.path.join(out, "stage3", "metrics.json"))  # as if stopped before its end
    stdout = pipeline(finished[0], out).stdout
    assert "stage3_multitask.py -> " + os.path.join(out, "stage3") in stdout and "resuming" in stdout


def test_a_changed_flag_stops_before_its_step_and_overwrites_nothing(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = open(os.path.join(out, "stage1", "checkpoint.pt"), "rb").read()
    result = pipeline(finished[0], out, extra=TINY.replace("--iters 2", "--iters 3"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: step stage1 was made with --iters 2, this run asks for --iters 3; "
        "use another OUT, or RESTART_FROM=stage1 to clear it and the steps after it")
    assert open(os.path.join(out, "stage1", "checkpoint.pt"), "rb").read() == before
    result = pipeline(finished[0], out, stage1_extra="--epochs 2", check=False)
    assert result.stderr.strip().startswith("error: step stage1 was made with --strong-aug, this run asks for absent;")
    # Running flags (workers, printing, device) are not part of a recipe.
    pipeline(finished[0], out, extra=TINY.replace("--workers 0", "--workers 1") + " --print-every 7")


def test_changed_code_stops_the_rerun(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    code = tmp_path / "code"
    code.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".sh")):
            shutil.copy(os.path.join(ROOT, name), code / name)
    with open(code / "common.py", "a") as f:
        f.write("\n# a change\n")
    result = pipeline(finished[0], out, here=str(code), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: step stage1 was made by another version of common.py")


def test_restart_from_clears_that_step_and_the_ones_after(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    kept = os.path.getmtime(os.path.join(out, "stage3", "checkpoint.pt"))
    stdout = pipeline(finished[0], out, RESTART_FROM="pseudo3").stdout
    assert f"{os.path.join(out, 'stage3')}: done, skipped" in stdout
    assert "stage2_pseudolabel.py -> " + os.path.join(out, "pseudo3") in stdout
    assert os.path.getmtime(os.path.join(out, "stage3", "checkpoint.pt")) == kept
    assert not os.path.exists(os.path.join(out, "control"))  # after pseudo3 in the order, so cleared
    result = pipeline(finished[0], out, RESTART_FROM="stage9", check=False)
    assert result.returncode != 0 and "RESTART_FROM=stage9 is not a step" in result.stderr
    fresh = str(tmp_path / "fresh")  # a mistyped step on a new OUT leaves nothing behind
    result = pipeline(finished[0], fresh, RESTART_FROM="stage9", check=False)
    assert result.returncode != 0 and not os.path.exists(fresh)


def test_a_step_made_outside_the_pipeline_is_not_taken_over(voc_template, tmp_path):
    out = tmp_path / "run"
    (out / "stage1").mkdir(parents=True)
    (out / "stage1" / "checkpoint.pt").write_bytes(b"someone else's")
    result = pipeline(voc_template, str(out), check=False)
    assert result.returncode != 0 and "exists but no recipe says how it was made" in result.stderr
