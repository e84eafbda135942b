"""`fastddpm demo` in its smoke mode: outputs, summary, reproducibility, data-parallel runs."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fastddpm[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install 'fastddpm[demo]')")
pytest.importorskip("tqdm", reason="the demo needs tqdm (pip install 'fastddpm[demo]')")

from fastddpm.cli import demo  # noqa: E402
from fastddpm.cli.demo.train import LossAverage, scaled_linear_betas  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(out, **kw):
    fields = dict(demo.SMOKE, device="cpu", out=str(out), progress=False)
    fields.update(kw)
    return demo.DemoConfig(**fields)


PRINTED = []  # the lines smoke_run printed


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    PRINTED.clear()
    summary = demo.run(smoke_config(out), log=PRINTED.append)
    return out, summary


def _load(out):
    with open(os.path.join(out, demo.SUMMARY)) as f:
        return json.load(f)


def test_every_output_is_written(smoke_run):
    out, _ = smoke_run
    assert sorted(os.listdir(out)) == sorted(demo.OUTPUTS)
    import matplotlib.image

    for name in (demo.SAMPLES_PNG, demo.LOSS_PNG):
        image = matplotlib.image.imread(os.path.join(out, name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"
    samples = np.load(os.path.join(out, demo.SAMPLES_NPY))
    assert samples.shape == (demo.SMOKE["sample_count"], 1, 8, 8)
    assert np.isfinite(samples).all()


def test_summary_is_complete_and_sane(smoke_run):
    out, returned = smoke_run
    s = _load(out)
    assert s == json.loads(json.dumps(returned))  # the file is what run() returned
    for key in ("config", "seed", "device", "backend", "world_size", "model", "schedule", "data", "timings",
                "throughput", "ema", "sampling", "losses", "final_loss_avg", "quality", "outputs", "versions",
                "command"):
        assert key in s, key
    cfg = s["config"]
    assert cfg["steps"] == demo.SMOKE["steps"] and s["seed"] == cfg["seed"] == 0
    assert s["device"] == "cpu" and s["world_size"] == 1 and s["backend"] in ("cpu", "reference")
    assert len(s["losses"]) == cfg["steps"]
    assert all(math.isfinite(v) and 0 < v < 10 for v in s["losses"])
    assert s["data"]["train"] + s["data"]["held_out"] == 1797
    for key in ("data_and_judge_s", "throughput_bursts_s", "train_s", "sample_trained_s",
                "sample_untrained_s", "total_s"):
        assert 0 < s["timings"][key] < 600, key
    tp = s["throughput"]
    assert tp["train_steps_per_s"] > 0 and tp["sample_steps_per_s"] > 0
    bursts = tp["bursts"]
    assert "reference" in bursts
    assert any(k != "reference" for k in bursts), "a fused backend's burst or the reason it is absent"
    for name, b in bursts.items():
        if name == "fused_unavailable":
            assert isinstance(b, str) and b
            continue
        assert b["backend"] == name and b["steps"] == demo.SMOKE["burst_steps"]
        assert b["train_steps_per_s"] > 0 and b["diffusion_ops_ms_per_step"] > 0
    q = s["quality"]
    assert 0.9 < q["held_out_classifier_accuracy"] <= 1
    for key in ("trained", "untrained", "real_train_digits"):
        assert 0.1 <= q[key]["classifier_confidence"] <= 1, key
        assert math.isfinite(q[key]["mmd2_to_held_out"]), key
        assert sum(q[key]["predicted_class_counts"]) == cfg["sample_count"], key
    # The floor: real digits must be much closer to the held-out digits than untrained noise.
    assert q["real_train_digits"]["mmd2_to_held_out"] < q["untrained"]["mmd2_to_held_out"] / 2
    assert s["versions"]["torch"] == torch.__version__


def test_summary_records_the_machine(smoke_run):
    """The CPU model (/proc/cpuinfo), the CPU kernels' ISA (fastddpm._C itself) and torch's threads."""
    from fastddpm import _extension

    m = _load(smoke_run[0])["machine"]
    ext = _extension.load()
    assert m["cpu_isa"] == (ext.cpu_isa() if ext is not None else None)
    assert m["threads"] == torch.get_num_threads() and m["device"] == "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            assert m["cpu"] == names[0]
    assert m["cpu"]


def test_same_seed_reproduces_the_run(smoke_run, tmp_path):
    out, first = smoke_run
    again = demo.run(smoke_config(tmp_path / "again"), log=lambda *a: None)
    assert again["losses"] == first["losses"]
    np.testing.assert_array_equal(np.load(tmp_path / "again" / demo.SAMPLES_NPY),
                                  np.load(os.path.join(out, demo.SAMPLES_NPY)))
    other = demo.run(smoke_config(tmp_path / "other", seed=1, burst_steps=1), log=lambda *a: None)
    assert other["losses"] != first["losses"]


def test_scaled_schedule_keeps_terminal_noise_level():
    # n_steps=1000 is the seed's schedule; shorter chains still end close to pure noise.
    torch.testing.assert_close(scaled_linear_betas(1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    for n in (20, 200, 1000):
        alpha_bar_T = torch.prod(1 - scaled_linear_betas(n))
        assert alpha_bar_T < 1e-3, n


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "--steps must be >= 1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(width=7), "--width must be even"),
    (dict(lr=-1.0), "--lr must be > 0"),
    (dict(ddim_steps=21), r"--ddim-steps must be at most --n-steps \(20\)"),
    (dict(dpm_steps=21), r"--dpm-steps must be at most --n-steps \(20\)"),
    (dict(ema_decay=1.0), r"--ema-decay must lie in \[0, 1\)"),
    (dict(device="nonsense"), "--device 'nonsense' is not a device"),
    (dict(device="mps"), "runs on cpu or cuda"),
])
def test_bad_config_is_a_clear_error(kw, match, tmp_path):
    with pytest.raises(demo.DemoError, match=match):
        demo.run(smoke_config(tmp_path, **kw), log=lambda *a: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_cuda_device_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(demo.DemoError, match="no CUDA GPU is visible"):
        demo.run(smoke_config(tmp_path, device="cuda"), log=lambda *a: None)


def test_torchrun_two_processes_trains_like_one(tmp_path, smoke_run):
    """2 gloo ranks on loopback: rank 0 alone writes; data and noise match the 1-process run."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastddpm", "demo", "--smoke", "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(demo.OUTPUTS)
    assert proc.stdout.count("sample quality vs") == 1, "only rank 0 reports"
    s = _load(out)
    assert s["world_size"] == 2
    assert s["config"]["batch_size"] == demo.SMOKE["batch_size"]
    # Each rank took half of the same global batch with disjoint noise (sample_offset = rank *
    # local batch), so only the order of float sums differs from the single-process run.
    single = smoke_run[1]
    np.testing.assert_allclose(s["losses"], single["losses"], rtol=2e-3)


def test_training_moves_samples_toward_the_data(tmp_path):
    """A short real run (a larger model than --smoke): the samples must approach the held-out
    digits in the judge's feature space, well past the untrained model (about 0.02 vs 0.1)."""
    cfg = smoke_config(tmp_path, steps=300, batch_size=64, width=16, n_steps=50, sample_count=64, lr=3e-3,
                       burst_steps=1)
    s = demo.run(cfg, log=lambda *a: None)
    q = s["quality"]
    assert q["trained"]["mmd2_to_held_out"] < q["untrained"]["mmd2_to_held_out"] / 3
    assert s["final_loss_avg"] < 0.5 * s["losses"][0]


def test_loss_average_is_a_bias_corrected_ema():
    # Equal to the decay-weighted mean of the losses so far: no pull toward 0 at the start.
    values = [3.0, 1.0, 2.0, 0.5, 4.0]
    avg = LossAverage(0.9)
    for k, v in enumerate(values, 1):
        weights = [0.9 ** (k - 1 - i) for i in range(k)]
        want = sum(w * x for w, x in zip(weights, values[:k])) / sum(weights)
        assert avg.update(v) == pytest.approx(want, rel=1e-12)


def test_summary_has_every_weights_and_sampler_run(smoke_run):
    """Raw and averaged weights by DDPM over all n_steps, by DDIM in ddim_steps and by DPM-Solver++
    in dpm_steps, and the untrained model by DDPM: each with its model calls, wall time and
    quality figures."""
    s = _load(smoke_run[0])
    cfg = s["config"]
    assert s["ema"]["decay"] == cfg["ema_decay"] == 0.995
    assert s["ema"]["updates"] == cfg["steps"]  # one update per optimiser step
    runs = s["sampling"]
    assert list(runs) == ["raw_ddpm", "raw_ddim", "raw_dpm", "ema_ddpm", "ema_ddim", "ema_dpm", "untrained_ddpm"]
    for name, run in runs.items():
        steps = {"ddpm": cfg["n_steps"], "ddim": cfg["ddim_steps"], "dpm": cfg["dpm_steps"]}[run["sampler"]]
        assert name == f"{run['weights']}_{run['sampler']}"
        assert run["steps"] == steps and run["model_calls"] == steps, name
        assert 0 < run["wall_s"] < 600, name
        assert 0.1 <= run["quality"]["classifier_confidence"] <= 1, name
        assert math.isfinite(run["quality"]["mmd2_to_held_out"]), name
        assert sum(run["quality"]["predicted_class_counts"]) == cfg["sample_count"], name
    assert runs["raw_ddim"]["kind"] == "ddim" and runs["raw_ddim"]["eta"] == 0.0
    assert cfg["ddim_steps"] == demo.SMOKE["ddim_steps"] < cfg["n_steps"]
    assert runs["raw_dpm"]["kind"] == "dpm++" and runs["raw_dpm"]["order"] == 2
    assert cfg["dpm_steps"] == demo.SMOKE["dpm_steps"] < cfg["n_steps"]
    # The raw DDPM run is what "quality.trained" has always reported.
    assert runs["raw_ddpm"]["quality"] == s["quality"]["trained"]
    assert runs["untrained_ddpm"]["quality"] == s["quality"]["untrained"]


def test_ddim_calls_the_model_at_the_trailing_timesteps(tmp_path):
    """The DDIM run calls the model once per step, at diffusers' "trailing" timesteps
    round(arange(T, 0, -T / steps)) - 1, written out here: 19, 15, 11, 7, 3 for T = 20, 5 steps."""
    from fastddpm.cli.demo.sample import sample

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.tolist())
            return torch.zeros_like(x)

    cfg = smoke_config(tmp_path)
    got = sample(Recorder(), cfg, torch.device("cpu"), "reference", "ddim")
    count = cfg.sample_count
    assert seen == [[t] * count for t in (19, 15, 11, 7, 3)]
    assert got.model_calls == 5 and got.steps == 5 and got.images.shape == (count, 1, 8, 8)


def test_ema_weights_are_the_float64_moving_average_of_the_weights(tmp_path):
    """The trainer's AveragedModel against the EMA recomputed in float64 from the weights after
    each step: e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k."""
    from fastddpm.cli.demo.model import TinyUNet
    from fastddpm.cli.demo.train import Trainer

    decay = 0.8  # far from 1, so a wrong update rule shows after a few steps
    cfg = smoke_config(tmp_path, ema_decay=decay)
    torch.manual_seed(0)
    init = TinyUNet(1, cfg.width).state_dict()
    from fastddpm.cli.demo.data import load_digits_split

    train_x = torch.from_numpy(load_digits_split()[0])
    trainer = Trainer(cfg, torch.device("cpu"), "reference", init, train_x, 0, 1)
    names = [n for n, _ in trainer.model.named_parameters()]
    ema = None
    for _ in range(4):
        trainer.step()
        w = {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}
        ema = w if ema is None else {n: decay * ema[n] + (1 - decay) * w[n] for n in names}
    got = dict(trainer.ema.module.named_parameters())
    moved = 0
    for n in names:
        torch.testing.assert_close(got[n].double(), ema[n], rtol=0, atol=1e-6)
        moved += not torch.allclose(got[n].double(), w[n], rtol=0, atol=1e-6)
    assert moved, "the average must differ from the last weights"


def test_samples_npy_is_what_the_output_says(smoke_run):
    """samples.npy holds the EMA weights' DDPM samples, as the last printed line says."""
    from fastddpm.cli.demo.sample import sample

    out, summary = smoke_run
    assert PRINTED[-1] == (f"  samples.npy: the EMA weights' {demo.SMOKE['n_steps']}-step DDPM samples, float32 "
                           f"[{demo.SMOKE['sample_count']}, 1, 8, 8], unclipped (the digits lie in [-1, 1])")
    saved = np.load(os.path.join(out, demo.SAMPLES_NPY))
    assert saved.dtype == np.float32 and saved.shape == (demo.SMOKE["sample_count"], 1, 8, 8)
    # Its quality figures are the EMA DDPM run's (the judge clips, the file does not).
    from fastddpm.cli.demo.data import load_digits_split
    from fastddpm.cli.demo.quality import QualityJudge

    train_x, train_y, held_x, held_y = load_digits_split()
    judge = QualityJudge(train_x.reshape(len(train_x), -1), train_y, held_x.reshape(len(held_x), -1), held_y)
    assert judge.score(saved.reshape(len(saved), -1)) == summary["sampling"]["ema_ddpm"]["quality"]


def test_the_output_explains_a_negative_mmd(smoke_run):
    note = [line for line in PRINTED if "MMD^2 is an unbiased estimate" in line]
    assert len(note) == 1 and "below" in note[0]


def test_panel_titles_carry_the_quality_figures(smoke_run):
    from fastddpm.cli.demo.report import panel_title

    run = _load(smoke_run[0])["sampling"]["ema_ddim"]
    q = run["quality"]
    title = panel_title("ema_ddim", run)
    assert title.startswith(f"trained, EMA, DDIM {demo.SMOKE['ddim_steps']} steps")
    assert f"confidence {q['classifier_confidence']:.3f}" in title
    assert f"MMD$^2$ {q['mmd2_to_held_out']:.4f}" in title


def _shape(line):
    """A printed line with its numbers replaced: the form that stays from run to run."""
    return re.sub(r"\s+", " ", re.sub(r"-?\d+(\.\d+)*", "#", line)).strip()


def test_readme_shows_what_the_demo_prints(smoke_run):
    """The README's sample output has the demo's lines, first and last included: the report from
    "sample quality" on has the same lines with other numbers (the machine line: its form)."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"^```\n(.*?)^```$", readme, re.S | re.M)  # the unlabelled ones: output
    shown = next(b for b in blocks if b.startswith("fastddpm demo: ")).splitlines()
    assert shown[0].startswith("fastddpm demo: 1438 training and 359 held-out 8x8 digits; device cpu")
    printed = PRINTED[PRINTED.index(next(p for p in PRINTED if p.startswith("sample quality"))):]
    shown = shown[shown.index(next(s for s in shown if s.startswith("sample quality"))):]
    assert len(shown) == len(printed), (shown, printed)
    for s, p in zip(shown, printed):
        if p.startswith("on "):
            assert s.startswith("on ") and ", 2 threads, CPU kernels " in s, s
        elif p.startswith("wrote "):
            assert s == "wrote summary.json, samples.png, loss.png, samples.npy to fastddpm-demo", s
        else:
            assert _shape(s) == _shape(p), (s, p)
