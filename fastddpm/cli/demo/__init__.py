"""``fastddpm demo``: train a small DDPM on scikit-learn's 8x8 digits, sample it, report.

The run, in order: load the digits (:mod:`.data`) and split off a fixed held-out set; fit the
quality judge (:mod:`.quality`) on the training digits; time short training bursts on the
fused backend and on the reference backend (:mod:`.throughput`); train the eps-model
(:mod:`.model`, :mod:`.train`) with :class:`fastddpm.DenoiseDiffusion`, keeping a moving
average of its weights; sample (:mod:`.sample`) the trained weights and their average with the
full DDPM chain, with DDIM and with DPM-Solver++ in a few steps, and the untrained model with DDPM; score every
set against the held-out digits; write the outputs (:mod:`.report`).

Under ``torchrun`` every rank trains on its shard of each global batch with
DistributedDataParallel (gloo on CPU, nccl on GPU) and rank 0 samples and writes the outputs.
All ranks draw the same permutation and the same noise seed; ``DenoiseDiffusion`` offsets each
rank's noise by ``rank * local batch``, so a 2-process run sees the data and noise of a
1-process run with the same global batch.
"""
import copy
import functools
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ... import backends
from .. import machine
from .._common import parse_device
from .config import SMOKE, DemoConfig, DemoError, check_config  # noqa: F401  (the demo's API)
from .data import load_digits_split, real_reference
from .model import TinyUNet
from .report import LOSS_PNG, OUTPUTS, SAMPLES_NPY, SAMPLES_NPY_RUN, SAMPLES_PNG, SUMMARY  # noqa: F401
from .report import make_output_folder, panel_title, report_lines, save_loss_png, save_samples_png
from .report import write_summary
from .sample import sample, sampler_options
from .throughput import burst_lines, fused_backends, fused_unavailable_reason, time_bursts
from .train import Trainer, sync, train


@dataclass
class _Run:
    """What every stage of one run needs."""
    cfg: DemoConfig
    device: torch.device
    backend: str
    rank: int
    world: int
    progress: bool
    out: str
    log: object
    t_start: float
    timings: dict = field(default_factory=dict)


def _dist():
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world


def resolve_device(name: str, world: int) -> torch.device:
    device = parse_device(name, "the demo", DemoError)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def run(cfg: DemoConfig, log=functools.partial(print, flush=True)) -> dict:
    """Run the demo; returns the summary written to ``summary.json`` (on every rank)."""
    t_start = time.perf_counter()
    check_config(cfg)
    rank, world = _dist()
    device = resolve_device(cfg.device, world)
    if cfg.batch_size % world:
        raise DemoError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    main = rank == 0
    progress = cfg.progress and main
    if not main:
        log = _quiet
    backend = backends.resolve(cfg.backend, device).name  # raises BackendUnavailableError
    out = os.path.abspath(cfg.out)
    if main:
        make_output_folder(out, cfg.out)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts, so each rank talks from its own GPU
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        summary = _run(_Run(cfg, device, backend, rank, world, progress, out, log, t_start))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return summary


def _run(r: _Run):
    cfg, device, backend, rank, world, log, timings = r.cfg, r.device, r.backend, r.rank, r.world, r.log, r.timings
    main = rank == 0
    t0 = time.perf_counter()
    train_x, train_y, held_x, held_y = load_digits_split()
    judge = None
    if main:
        from .quality import QualityJudge
        judge = QualityJudge(train_x.reshape(len(train_x), -1), train_y, held_x.reshape(len(held_x), -1), held_y)
    timings["data_and_judge_s"] = time.perf_counter() - t0
    log(f"fastddpm demo: {len(train_x)} training and {len(held_x)} held-out 8x8 digits; device {device}, "
        f"backend {backend}, {world} process(es), torch {torch.__version__}")

    torch.manual_seed(cfg.seed)
    init_state = copy.deepcopy(TinyUNet(1, cfg.width).state_dict())
    n_params = sum(v.numel() for v in init_state.values())
    train_dev = torch.from_numpy(train_x).to(device)

    # Throughput of the fused backend and of the reference backend, same model, same run.
    t0 = time.perf_counter()
    fused = fused_backends(device)
    bursts = time_bursts(cfg, device, fused + ["reference"], init_state, train_dev, rank, world)
    if not fused:
        bursts["fused_unavailable"] = fused_unavailable_reason()
    timings["throughput_bursts_s"] = time.perf_counter() - t0
    for line in burst_lines(bursts, fused):
        log(line)

    trainer = Trainer(cfg, device, backend, init_state, train_dev, rank, world)
    t0 = time.perf_counter()
    losses = train(trainer, cfg, r.progress)
    sync(device)
    timings["train_s"] = time.perf_counter() - t0

    summary = None
    if main:
        summary = _sample_and_report(r, trainer, init_state, n_params, losses, bursts, judge, train_x, held_x)
    if world > 1:
        torch.distributed.barrier()  # the other ranks wait while rank 0 samples and writes
    return summary


def _sample_and_report(r: _Run, trainer, init_state, n_params, losses, bursts, judge, train_x, held_x):
    """Rank 0: sample the trained weights and their moving average by DDPM, DDIM and DPM-Solver++, and the
    untrained model by DDPM; score every set; write every output."""
    from .quality import quality_figures

    cfg, device, backend, progress, out, timings = r.cfg, r.device, r.backend, r.progress, r.out, r.timings

    untrained = TinyUNet(1, cfg.width).to(device)
    untrained.load_state_dict(init_state)
    runs = {}  # name -> Samples, in the order of the picture
    for name, model, sampler in (("raw_ddpm", trainer.model, "ddpm"), ("raw_ddim", trainer.model, "ddim"),
                                 ("raw_dpm", trainer.model, "dpm"), ("ema_ddpm", trainer.ema, "ddpm"),
                                 ("ema_ddim", trainer.ema, "ddim"), ("ema_dpm", trainer.ema, "dpm"),
                                 ("untrained_ddpm", untrained, "ddpm")):
        runs[name] = sample(model, cfg, device, backend, sampler, progress)
    timings["sample_trained_s"] = runs["raw_ddpm"].wall_s
    timings["sample_untrained_s"] = runs["untrained_ddpm"].wall_s
    real = real_reference(train_x, min(cfg.sample_count, len(held_x)))
    quality = quality_figures(judge, runs["raw_ddpm"].images.numpy(), runs["untrained_ddpm"].images.numpy(), real)
    sampling = {}
    for name, run_ in runs.items():
        weights = name.split("_")[0]
        sampling[name] = {"weights": weights, "sampler": run_.sampler, **sampler_options(run_.sampler),
                          "steps": run_.steps, "model_calls": run_.model_calls, "wall_s": run_.wall_s,
                          "quality": judge.score(run_.images.numpy().reshape(len(run_.images), -1))}
    samples = runs[SAMPLES_NPY_RUN].images.numpy()

    np.save(os.path.join(out, SAMPLES_NPY), samples)
    save_samples_png(os.path.join(out, SAMPLES_PNG), [
        *((panel_title(name, sampling[name]), runs[name].images.numpy()[:, 0]) for name in runs),
        ("real (held out)", held_x[:cfg.sample_count, 0])])
    save_loss_png(os.path.join(out, LOSS_PNG), losses,
                  f"TinyUNet ({n_params / 1e3:.0f}k params), batch {cfg.batch_size}, backend {backend}")
    timings["total_s"] = time.perf_counter() - r.t_start
    train_s = timings["train_s"]
    summary = {
        "config": asdict(cfg), "seed": cfg.seed, "device": str(device), "backend": backend,
        "world_size": r.world, "model": {"name": "TinyUNet", "width": cfg.width, "parameters": n_params},
        "schedule": "linear betas scaled to n_steps (1e-4 .. 0.02 at n_steps=1000)",
        "data": {"name": "sklearn.datasets.load_digits", "train": len(train_x), "held_out": len(held_x)},
        "timings": timings,
        "throughput": {"train_steps_per_s": cfg.steps / train_s,
                       "train_samples_per_s": cfg.steps * cfg.batch_size / train_s,
                       "sample_steps_per_s": cfg.n_steps / timings["sample_trained_s"],
                       "bursts": bursts},
        "ema": {"decay": cfg.ema_decay, "updates": int(trainer.ema.n_averaged),
                "how": "torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)), "
                       "updated after every optimiser step"},
        "sampling": sampling,
        "losses": losses,
        "final_loss_avg": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "quality": quality,
        "outputs": list(OUTPUTS),
        "machine": machine.describe(device),
        "versions": {**machine.versions("numpy", "sklearn", "triton"), "cuda": torch.version.cuda},
        "command": " ".join(sys.argv),
    }
    write_summary(out, summary)
    # The folder as the user wrote it (relative to where they ran the command), else absolute.
    for line in report_lines(summary, cfg.out if not os.path.isabs(cfg.out) else out):
        r.log(line)
    return summary


def _quiet(*args, **kwargs):
    pass
