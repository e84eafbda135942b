"""``fastddpm demo``: train a small DDPM on scikit-learn's 8x8 digits, sample it, report.

The run, in order: load the digits (shipped inside scikit-learn, no download) and split off a
fixed held-out set; fit the quality judge on the training digits; time short training bursts
on the fused backend and on the reference backend; train the eps-model with
:class:`fastddpm.DenoiseDiffusion`; sample with the full reverse process from the trained and
from the untrained model; score both against the held-out digits; write the outputs.

Under ``torchrun`` every rank trains on its shard of each global batch with
DistributedDataParallel (gloo on CPU, nccl on GPU) and rank 0 samples and writes the outputs.
All ranks draw the same permutation and the same noise seed; ``DenoiseDiffusion`` offsets each
rank's noise by ``rank * local batch``, so a 2-process run sees the data and noise of a
1-process run with the same global batch.
"""
import copy
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import __version__, backends, schedule
from ._common import parse_device
from .demo_model import TinyUNet
from ..diffusion import DenoiseDiffusion

SUMMARY = "summary.json"
SAMPLES_PNG = "samples.png"
LOSS_PNG = "loss.png"
SAMPLES_NPY = "samples.npy"
OUTPUTS = (SUMMARY, SAMPLES_PNG, LOSS_PNG, SAMPLES_NPY)

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0  # the held-out split is fixed, so quality figures compare across --seed values
LOSS_SMOOTHING = 0.95  # exponential moving average shown in the progress bar and the plot


class DemoError(Exception):
    """A bad option or environment; the message says what to do. The CLI exits with 2."""


@dataclass
class DemoConfig:
    steps: int = 1200
    batch_size: int = 128  # global: split over the ranks under torchrun
    n_steps: int = 1000
    width: int = 24
    lr: float = 2e-3
    sample_count: int = 100
    burst_steps: int = 20
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    out: str = "fastddpm-demo"
    progress: bool = True


# Fields --smoke changes (tests and a quick look): seconds instead of minutes.
SMOKE = dict(steps=6, batch_size=32, n_steps=20, width=8, sample_count=24, burst_steps=2)


def scaled_linear_betas(n_steps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule stretched to ``n_steps`` so alpha_bar at T stays near 4e-5.

    For n_steps = 1000 it is exactly the seed's ``linspace(1e-4, 0.02)``; shorter chains take
    proportionally larger steps (Nichol & Dhariwal 2021) so x_T is still close to pure noise.
    """
    scale = 1000.0 / n_steps
    return schedule.linear(n_steps, 1e-4 * scale, min(0.02 * scale, 0.999))


# ---- set-up ---------------------------------------------------------------------------------

def _dist():
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world


def resolve_device(name: str, world: int) -> torch.device:
    device = parse_device(name, "the demo", DemoError)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def load_digits_split():
    """scikit-learn's 8x8 digits in [-1, 1] as ([N,1,8,8] train, labels, held-out, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values are 0..16
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    n_held = int(len(images) * HELD_OUT_FRACTION)
    held, train = order[:n_held], order[n_held:]
    return images[train], digits.target[train], images[held], digits.target[held]


FUSED_BACKENDS = backends.KERNEL_BACKENDS


def fused_backends(device: torch.device) -> list:
    """The fused (non-reference) backends that can run on ``device`` in this process."""
    names = []
    for name in FUSED_BACKENDS:
        if name == "triton" and device.type == "cpu":
            continue  # Triton's interpreter (TRITON_INTERPRET=1) checks kernels; it is not fast
        try:
            backends.resolve(name, device)
        except backends.BackendUnavailableError:
            continue
        names.append(name)
    return names


def _fused_unavailable_reason() -> str:
    return "; ".join(f"{n}: {backends.status(n)[1]}" for n in FUSED_BACKENDS)


# ---- training -------------------------------------------------------------------------------

class Trainer:
    """The training loop shared by the timed bursts and the main run."""

    def __init__(self, cfg: DemoConfig, device, backend: str, init_state: dict, train_x: torch.Tensor,
                 rank: int, world: int):
        self.model = TinyUNet(1, cfg.width).to(device)
        self.model.load_state_dict(init_state)
        wrapped = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.diffusion = DenoiseDiffusion(wrapped, cfg.n_steps, device, schedule=scaled_linear_betas(cfg.n_steps),
                                          backend=backend)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(cfg.steps, 1))
        self.train_x, self.rank, self.world = train_x, rank, world
        self.local = cfg.batch_size // world
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same on every rank
        self.noise_gen = torch.Generator(device).manual_seed(cfg.seed + 2)

    def step(self) -> torch.Tensor:
        """One optimiser step; returns the loss averaged over the global batch (detached)."""
        idx = torch.randperm(len(self.train_x), generator=self.data_gen)[:self.local * self.world]
        x0 = self.train_x[idx[self.rank * self.local:(self.rank + 1) * self.local]]
        loss = self.diffusion.loss(x0, generator=self.noise_gen)  # sample_offset: rank * local
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        loss = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(loss)
            loss = loss / self.world
        return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Scale(torch.nn.Module):
    """An eps-model that costs nothing, to time the diffusion ops of a training step alone."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return x * self.w


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_bursts(cfg, device, names, init_state, train_x, rank, world) -> dict:
    """Training steps per second on each backend in ``names``, and the diffusion ops' own cost.

    The backends take turns, one step each, and the figures are medians: a machine shared with
    other work slows every backend alike instead of whichever happened to run during a spike.
    """
    warmup, ops_reps = 2, 5
    trainers = {n: Trainer(cfg, device, n, init_state, train_x, rank, world) for n in names}
    # The same loss calls with a free eps-model: what the backend itself costs per step.
    ops_only = {n: DenoiseDiffusion(_Scale().to(device), cfg.n_steps, device, backend=n) for n in names}
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x0 = train_x[:cfg.batch_size // world]
    steps = {n: [] for n in names}
    ops = {n: [] for n in names}
    for i in range(warmup + cfg.burst_steps):
        for n in names:
            step_s = _timed(trainers[n].step, device)
            ops_s = [_timed(lambda: ops_only[n].loss(x0, generator=gen, sample_offset=0).backward(), device)
                     for _ in range(ops_reps)]
            if i >= warmup:
                steps[n].append(step_s)
                ops[n].extend(ops_s)
    out = {}
    for n in names:
        step_s = float(np.median(steps[n]))
        out[n] = {"backend": n, "steps": cfg.burst_steps, "train_steps_per_s": 1.0 / step_s,
                  "train_samples_per_s": cfg.batch_size / step_s,
                  "diffusion_ops_ms_per_step": 1e3 * float(np.median(ops[n]))}
    return out


class LossAverage:
    """Exponential moving average of the loss, bias-corrected as in Adam so early steps are not
    dragged toward zero-initialised history; shown in the progress bar and the loss plot."""

    def __init__(self, decay: float = LOSS_SMOOTHING):
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.value = self.decay * self.value + (1 - self.decay) * loss
        return self.value / (1 - self.decay ** self.count)


def train(trainer: Trainer, cfg: DemoConfig, progress: bool) -> list:
    from tqdm.auto import tqdm

    losses, average = [], LossAverage()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        loss = float(trainer.step())
        if not np.isfinite(loss):
            raise DemoError(f"the training loss became {loss} at step {len(losses)}; try a smaller --lr")
        losses.append(loss)
        bar.set_postfix(loss=f"{average.update(loss):.4f}", refresh=False)
    return losses


@torch.no_grad()
def sample(model, cfg: DemoConfig, device, backend, desc: str, progress: bool) -> torch.Tensor:
    """The full reverse process, t = n_steps-1 .. 0, from x_T ~ N(0, I); [count, 1, 8, 8]."""
    from tqdm.auto import tqdm

    model.eval()
    diffusion = DenoiseDiffusion(model, cfg.n_steps, device, schedule=scaled_linear_betas(cfg.n_steps),
                                 backend=backend)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    x = torch.randn(cfg.sample_count, 1, 8, 8, device=device, generator=gen)
    for t in tqdm(range(cfg.n_steps - 1, -1, -1), desc=desc, unit="step", disable=not progress,
                  dynamic_ncols=True):
        x = diffusion.p_sample(x, t, generator=gen, sample_offset=0)
    return x.float().cpu()


# ---- outputs --------------------------------------------------------------------------------

def _grid(images: np.ndarray, cols: int) -> np.ndarray:
    """[N, 8, 8] -> one image with a 1-pixel gap, padded with blanks to full rows."""
    rows = -(-len(images) // cols)
    h, w = images.shape[1:]
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), np.nan)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = im
    return out


def save_samples_png(path, panels):
    """``panels``: [(title, [N, 8, 8] images in [-1, 1])], drawn side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = int(np.ceil(np.sqrt(max(len(p[1]) for p in panels))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")  # NaN: the gaps of the grid
    for ax, (title, images) in zip(np.atleast_1d(axes), panels):
        ax.imshow(_grid(np.clip(images, -1, 1), cols), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_png(path, losses, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    average = LossAverage()
    smooth = [average.update(v) for v in losses]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss per step")
    ax.plot(steps, smooth, color="tab:blue", lw=1.8, label="moving average")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MSE of eps prediction")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict:
    out = {"python": platform.python_version(), "fastddpm": __version__, "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("sklearn", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    out["cuda"] = torch.version.cuda
    return out


# ---- the run --------------------------------------------------------------------------------

def run(cfg: DemoConfig, log=functools.partial(print, flush=True)) -> dict:
    """Run the demo; returns the summary written to ``summary.json`` (on every rank)."""
    t_start = time.perf_counter()
    _check_config(cfg)
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
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise DemoError(f"--out {cfg.out}: cannot create the output folder ({e.strerror})") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts, so each rank talks from its own GPU
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        summary = _run(cfg, device, backend, rank, world, main, progress, out, log, t_start)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return summary


def _run(cfg, device, backend, rank, world, main, progress, out, log, t_start):
    timings = {}
    t0 = time.perf_counter()
    train_x, train_y, held_x, held_y = load_digits_split()
    judge = None
    if main:
        from .demo_quality import QualityJudge
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
        bursts["fused_unavailable"] = _fused_unavailable_reason()
    timings["throughput_bursts_s"] = time.perf_counter() - t0
    for line in _burst_lines(bursts, fused):
        log(line)

    trainer = Trainer(cfg, device, backend, init_state, train_dev, rank, world)
    t0 = time.perf_counter()
    losses = train(trainer, cfg, progress)
    _sync(device)
    timings["train_s"] = time.perf_counter() - t0

    summary = None
    if main:
        untrained = TinyUNet(1, cfg.width).to(device)
        untrained.load_state_dict(init_state)
        t0 = time.perf_counter()
        samples = sample(trainer.model, cfg, device, backend, "sample (trained)", progress)
        _sync(device)
        timings["sample_trained_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        untrained_samples = sample(untrained, cfg, device, backend, "sample (untrained)", progress)
        timings["sample_untrained_s"] = time.perf_counter() - t0

        flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
        n = min(cfg.sample_count, len(held_x))
        real_ref = train_x[np.random.RandomState(SPLIT_SEED).permutation(len(train_x))[:n]]
        quality = {"trained": judge.score(flat(samples.numpy())),
                   "untrained": judge.score(flat(untrained_samples.numpy())),
                   "real_train_digits": judge.score(flat(real_ref)),
                   "held_out_classifier_accuracy": judge.held_out_accuracy,
                   "note": "classifier_confidence: mean top-class probability of a logistic regression "
                           "fitted on the training digits (higher is better); mmd2_to_held_out: unbiased "
                           "RBF-kernel MMD^2 to the held-out digits in a 16-d PCA space (lower is "
                           "better); real_train_digits is the floor real data reaches. The untrained "
                           "model's output layer starts at zero, so its samples are the reverse process "
                           "with eps_theta = 0"}

        np.save(os.path.join(out, SAMPLES_NPY), samples.numpy())
        save_samples_png(os.path.join(out, SAMPLES_PNG), [
            ("untrained model", untrained_samples.numpy()[:, 0]),
            (f"trained, {cfg.steps} steps", samples.numpy()[:, 0]),
            ("real (held out)", held_x[:cfg.sample_count, 0])])
        save_loss_png(os.path.join(out, LOSS_PNG), losses,
                      f"TinyUNet ({n_params / 1e3:.0f}k params), batch {cfg.batch_size}, backend {backend}")
        timings["total_s"] = time.perf_counter() - t_start
        train_s = timings["train_s"]
        summary = {
            "config": asdict(cfg), "seed": cfg.seed, "device": str(device), "backend": backend,
            "world_size": world, "model": {"name": "TinyUNet", "width": cfg.width, "parameters": n_params},
            "schedule": "linear betas scaled to n_steps (1e-4 .. 0.02 at n_steps=1000)",
            "data": {"name": "sklearn.datasets.load_digits", "train": len(train_x), "held_out": len(held_x)},
            "timings": timings,
            "throughput": {"train_steps_per_s": cfg.steps / train_s,
                           "train_samples_per_s": cfg.steps * cfg.batch_size / train_s,
                           "sample_steps_per_s": cfg.n_steps / timings["sample_trained_s"],
                           "bursts": bursts},
            "losses": losses,
            "final_loss_avg": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "quality": quality,
            "outputs": list(OUTPUTS),
            "versions": versions(),
            "command": " ".join(sys.argv),
        }
        with open(os.path.join(out, SUMMARY), "w") as f:
            json.dump(summary, f, indent=2)
        for line in _report_lines(summary, out):
            log(line)
    if world > 1:
        torch.distributed.barrier()  # the other ranks wait while rank 0 samples and writes
    return summary


def _check_config(cfg: DemoConfig):
    for field in ("steps", "batch_size", "n_steps", "width", "sample_count", "burst_steps"):
        if getattr(cfg, field) < 1:
            raise DemoError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(cfg, field)}")
    if cfg.width % 2:
        raise DemoError(f"--width must be even (the timestep embedding is sin/cos pairs), got {cfg.width}")
    if cfg.sample_count < 2:
        raise DemoError(f"--sample-count must be >= 2 to score the samples, got {cfg.sample_count}")
    if not cfg.lr > 0:
        raise DemoError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.seed < 2**63:
        raise DemoError(f"--seed must lie in [0, 2**63), got {cfg.seed}")


def _quiet(*args, **kwargs):
    pass


def _burst_lines(bursts, fused):
    lines = ["training throughput (same model and batch, medians of interleaved steps in this run):"]
    for name, b in bursts.items():
        if isinstance(b, dict):
            lines.append(f"  {name:>9}: {b['train_steps_per_s']:7.1f} steps/s ({b['train_samples_per_s']:8.0f} "
                         f"samples/s); diffusion ops alone {b['diffusion_ops_ms_per_step']:.3f} ms/step")
    if not fused:
        lines.append(f"  no fused backend here ({bursts['fused_unavailable']})")
    return lines


def _report_lines(summary, out):
    q = summary["quality"]
    lines = [f"sample quality vs {summary['data']['held_out']} held-out digits "
             f"(classifier accuracy on them: {q['held_out_classifier_accuracy']:.3f}):",
             f"  {'':>18} {'confidence (higher=better)':>27} {'MMD^2 (lower=better)':>22}"]
    for key, label in (("untrained", "untrained model"), ("trained", "trained model"),
                       ("real_train_digits", "real digits")):
        lines.append(f"  {label:>18} {q[key]['classifier_confidence']:27.3f} {q[key]['mmd2_to_held_out']:22.4f}")
    t = summary["timings"]
    lines.append(f"trained {summary['config']['steps']} steps in {t['train_s']:.1f} s "
                 f"({summary['throughput']['train_steps_per_s']:.1f} steps/s), final loss "
                 f"{summary['final_loss_avg']:.4f}; sampled {summary['config']['n_steps']} steps in "
                 f"{t['sample_trained_s']:.1f} s; total {t['total_s']:.1f} s")
    lines.append(f"wrote {', '.join(summary['outputs'])} to {out}")
    return lines
