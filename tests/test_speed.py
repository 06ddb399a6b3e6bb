"""The speed options change results only by floating-point noise, and benchmark.py runs and reports."""
import argparse
import json

import pytest
import torch

import benchmark
import common
import training
import stage1_train
import stage3_multitask
from conftest import assert_user_error, run_script


def flags(**kw):
    # SGD: its update is linear in the gradient, so rounding differences stay rounding-sized (Adam divides them by ~0).
    return argparse.Namespace(**{"lr": 1e-2, "head_lr_mult": 1.0, "optimizer": "sgd", "weight_decay": 1e-4, "warmup": 0,
                                 "iters": 100, "distributed": False, "compile": False, "channels_last": False, "amp": False,
                                 "w_sup": 1.0, "w_con": 0.5, "ema_decay": None, **kw})


def train_stage1(options, steps=3):
    torch.manual_seed(0)
    model = common.build_model("tiny_unet", 4, weights="none")
    args = flags(**options)
    optimizer, scheduler = training.make_optimizer(model, args)
    net = training.prepare_model(model, args, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(2, 3, 16, 16, generator=g)
        images = images.contiguous(memory_format=torch.channels_last) if args.channels_last else images
        masks = torch.randint(0, 4, (2, 16, 16), generator=g)
        stage1_train.train_one_step(net, images, masks, optimizer, scheduler, False)
    return model.state_dict()


def train_multitask(options, steps=3):
    torch.manual_seed(0)
    student = common.build_model("tiny_unet", 4, weights="none", aux_head="separate")
    args = flags(**options)
    optimizer, scheduler = training.make_optimizer(student, args)
    net = training.prepare_model(student, args, torch.device("cpu"))
    teacher, update_teacher = stage3_multitask.make_teacher(student)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        def image(n):
            images = torch.randn(n, 3, 16, 16, generator=g)
            return images.contiguous(memory_format=torch.channels_last) if args.channels_last else images
        labeled = (image(1), torch.randint(0, 4, (1, 16, 16), generator=g), torch.randint(0, 4, (1, 16, 16), generator=g))
        unlabeled = (image(2), image(2), torch.randint(0, 4, (2, 16, 16), generator=g), torch.arange(256).view(16, 16).repeat(2, 1, 1))
        stage3_multitask.train_one_step(net, teacher, update_teacher, labeled, unlabeled, optimizer, scheduler, args)
    return {**student.state_dict(), **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}


def assert_close(a, b):
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4), key


def test_channels_last_changes_nothing_but_rounding():
    assert_close(train_stage1({}), train_stage1({"channels_last": True}))
    assert_close(train_multitask({}), train_multitask({"channels_last": True}))


def test_the_steps_differ_when_they_should():  # the comparison above can fail: another seed is not close
    torch.manual_seed(5)
    different = train_stage1({}, steps=4)
    with pytest.raises(AssertionError):
        assert_close(train_stage1({}), different)


def test_compile_changes_nothing_but_rounding():
    assert_close(train_stage1({}, steps=2), train_stage1({"compile": True}, steps=2))


def test_benchmark_runs_on_the_cpu_in_a_steady_state_and_projects_the_pipeline(tmp_path):
    report_path = str(tmp_path / "bench.json")
    result = run_script("benchmark.py", "--device", "cpu", "--backbone", "tiny_unet", "--shrink", 16, "--steps", 2,
                        "--repeats", 3, "--min-warmup", 2, "--max-warmup", 6, "--loader-images", 6, "--workers", 0, "--json", report_path)
    report = json.load(open(report_path))
    cases = {(r["dataset"], r["case"]) for r in report["cases"]}
    assert cases == {(d, c) for d in ["voc", "cityscapes"] for c in ["stage 1", "multi-task, ĝ", "multi-task, g̃", "pseudo-labels / eval"]}
    for r in report["cases"]:
        assert r["steps_per_s"] > 0 and r["tflop_per_step"] > 0 and r["images_per_s"] == pytest.approx(r["steps_per_s"] * r["images_per_step"])
        low, high = r["steps_per_s_range"]
        assert low <= r["steps_per_s"] <= high and 2 <= r["warmup_steps"] <= 6  # the median of the repeats, and their spread
    assert set(report["loaders"]["voc"]) == {"stage 1", "multi-task (weak + S)", "pseudo-labels / eval"}
    projection = report["projection"]["voc"]
    assert projection["total_hours"] == pytest.approx(sum(projection["hours"].values())) and projection["total_hours"] > 0
    assert "projected voc pipeline at its default lengths" in result.stdout and "TFLOP/step" in result.stdout
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "results"}')
    result = run_script("benchmark.py", "--device", "cpu", "--json", mine, check=False)
    assert_user_error(result, f"--json {mine} exists and was not written by benchmark.py")
    assert mine.read_text() == '{"my": "results"}'



def test_idle_gaps_are_the_times_no_kernel_ran_and_name_what_the_cpu_ran():
    busy, wall, gaps = benchmark.idle_gaps([(20, 25), (0, 10), (5, 12), (30, 31), (24, 26)])
    assert (busy, wall, gaps) == (19, 31, [(8, 12), (4, 26)])  # 0-12, 20-26 and 30-31 busy; idle 12-20 and 26-30
    operators = [(0, 40, "step"), (11, 19, "Optimizer.step"), (14, 17, "cudaStreamSynchronize"), (25, 29, "aten::item")]
    assert benchmark.running_at(operators, 16) == "step > Optimizer.step > cudaStreamSynchronize"
    assert benchmark.running_at(operators, 28) == "step > aten::item" and benchmark.running_at(operators, 50) == "no operator"


def test_profile_of_a_step_names_its_operators_and_writes_a_trace(tmp_path):
    report, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    profile = ["--device", "cpu", "--backbone", "tiny_unet", "--shrink", 16, "--steps", 2, "--repeats", 1, "--min-warmup", 2,
               "--max-warmup", 4, "--datasets", "voc", "--profile", "multi-task, ĝ", "--json", report, "--trace", trace]
    result = run_script("benchmark.py", *profile)
    top = json.load(open(report))["profile"]["top"]
    assert "aten::convolution_backward" in {row["name"] for row in top} and all(row["self_ms"] >= 0 for row in top)
    counts = json.load(open(report))["profile"]
    assert counts["kernels_per_step"] == 0 and 50 < counts["operators_per_step"] < 5000 and "operators from Python" in result.stdout
    assert "traceEvents" in json.load(open(trace)) and "the profile of 2 steps" in result.stdout
    run_script("benchmark.py", *profile)  # the same command replaces its own trace
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert_user_error(run_script("benchmark.py", *profile[:-1], mine, check=False), f"--trace {mine} exists and was not written")
    assert_user_error(run_script("benchmark.py", "--trace", trace, check=False), "--trace goes with --profile")


def test_profile_reports_the_devices_idle_gaps(tmp_path, monkeypatch):
    """The GPU's part of --profile, with the CPU's operators standing in for the kernels (no GPU here)."""
    cpu = torch.autograd.DeviceType.CPU
    monkeypatch.setattr(torch.autograd, "DeviceType", argparse.Namespace(CUDA=cpu, CPU=cpu))
    report = tmp_path / "profile.json"
    result = run_script("benchmark.py", "--device", "cpu", "--backbone", "tiny_unet", "--shrink", 16, "--steps", 2, "--repeats", 1,
                        "--min-warmup", 2, "--max-warmup", 4, "--datasets", "voc", "--profile", "stage 1", "--json", report)
    profile = json.load(open(report))["profile"]
    assert 0 < profile["device_busy_ms"] <= profile["device_wall_ms"] and profile["gaps"] > 0
    assert profile["kernels_per_step"] > profile["operators_per_step"] > 0  # every CPU event stands in for a kernel here
    longest = [gap["ms"] for gap in profile["longest_gaps"]]
    assert len(longest) == min(10, profile["gaps"]) and longest == sorted(longest, reverse=True) and "idle gaps" in result.stdout

def test_warm_up_lasts_until_the_step_time_settles(monkeypatch):
    """A step that is slow for its first calls (as compiled code is) is warmed up until it is not. The clock is
    the test's own, so that a busy machine cannot move the result."""
    calls, clock = [], [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])

    def step():
        calls.append(1)
        clock[0] += 0.02 if len(calls) <= 12 else 0.002
    args = argparse.Namespace(steps=3, repeats=3, min_warmup=13, max_warmup=60)
    median, slowest, fastest, warmup = benchmark.time_steps(step, args, torch.device("cpu"))
    assert warmup == 18 and slowest < 0.005  # the slow calls are all in the warm-up: it ends once the speed settles
    calls.clear()
    args.min_warmup = 3  # too short a minimum: the two slow blocks look settled, and the slow calls are timed
    assert benchmark.time_steps(step, args, torch.device("cpu"))[1] > 0.005
    calls.clear()
    assert benchmark.time_steps(step, args, torch.device("cpu"), compiled=True)[3] == 51  # compiled: 50 at least...
    args.max_warmup = 6
    calls.clear()
    assert benchmark.time_steps(step, args, torch.device("cpu"), compiled=True)[3] == 6  # ...but never past the cap


def test_benchmark_runs_the_scripts_end_to_end(tmp_path):
    report_path = str(tmp_path / "bench.json")
    run_script("benchmark.py", "--scripts", "--device", "cpu", "--backbone", "tiny_unet", "--shrink", 16, "--train-images", 10,
               "--script-steps", 3, "--steps", 1, "--repeats", 2, "--max-warmup", 2, "--workers", 0, "--json", report_path)
    scripts = {s["script"]: s for s in json.load(open(report_path))["scripts"]}
    assert list(scripts) == ["stage1_train.py", "stage2_pseudolabel.py", "stage3_multitask.py", "evaluate.py"]
    assert scripts["stage2_pseudolabel.py"]["length"] == 10 and scripts["stage2_pseudolabel.py"]["rate"] > 0
    assert scripts["stage1_train.py"]["ratio"] == pytest.approx(scripts["stage1_train.py"]["rate"] / scripts["stage1_train.py"]["benchmark_rate"])
