"""A whole training step under ``torch.compile(fullgraph=True, dynamic=True)``: fastddpm's loss
against labml's eager loss, each compiled the same way (benchmarks/goals.py, ``--only
train_step_compiled``).

A step is ``loss = loss_fn(x0); loss.backward()``: the model's forward, the loss and the whole
backward, accumulating into the parameters' ``.grad`` (set to None before each step, as
``optimizer.zero_grad()`` does). Dynamo traces ``Tensor.backward()`` only with
``torch._dynamo.config.trace_autograd_ops = True`` (torch 2.13; without it ``fullgraph=True``
fails with "Unsupported Tensor.backward() call"); it then rewrites the call as
``torch.autograd.grad`` plus the ``.grad`` accumulation, and AOTAutograd traces the joint
forward and backward into ONE graph that inductor compiles, for every batch size (``dynamic=True``).
The flag matters when Dynamo traces (the first call, or a recompile), not when the compiled code
runs: :func:`compile_training_step` sets it for the first call only, as setting a Dynamo config
costs microseconds per call (18 us for ``config.patch``). A later recompile would run without it
and, with ``fullgraph=True``, raise instead of silently splitting the step.

    python benchmarks/compile_step.py [--threads 1] [--rounds 15] [--sizes tiny cifar]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastddpm.cli import timing  # noqa: E402
from fastddpm.cli.bench import cases as B  # noqa: E402
from fastddpm.cli.bench.baselines import LabmlDiffusion  # noqa: E402
from fastddpm.cli.scale_model import ScaleModel  # noqa: E402
from fastddpm.diffusion import DenoiseDiffusion  # noqa: E402

NAME = "train_step_compiled"  # goals.py --only name
SIZES = ("tiny", "cifar")
MODELS = ("scale", "conv")
GOAL = 1.0  # the compiled fused step at most as slow as the compiled eager (labml) step
SAMPLE_S = 0.01


class ConvEpsModel(nn.Module):
    """A small real eps-model: a learned embedding of t added to x_t, then a 3x3 convolution."""

    def __init__(self, channels: int, n_steps: int = B.N_STEPS):
        super().__init__()
        self.emb = nn.Embedding(n_steps, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x + self.emb(t)[:, :, None, None])


def make_model(kind: str, channels: int, seed: int = 0) -> nn.Module:
    """``scale``: the bench's one-parameter ScaleModel (the diffusion's own work alone, as the
    train_step case); ``conv``: :class:`ConvEpsModel`."""
    torch.manual_seed(seed)
    if kind == "scale":
        return ScaleModel()
    if kind == "conv":
        return ConvEpsModel(channels)
    raise ValueError(f"model kind must be one of {MODELS}, got {kind!r}")


def training_step(loss_fn):
    """``step(x0)``: the loss, its backward into the parameters' ``.grad``; returns the loss detached."""
    def step(x0):
        loss = loss_fn(x0)
        loss.backward()
        return loss.detach()
    return step


def compile_training_step(loss_fn, params, backend="inductor"):
    """``run(x0)``: the parameters' grads set to None, then :func:`training_step` compiled with
    ``fullgraph=True, dynamic=True`` (Dynamo traces its first call with trace_autograd_ops on)."""
    compiled = torch.compile(training_step(loss_fn), fullgraph=True, dynamic=True, backend=backend)
    params = list(params)
    traced = []

    def run(x0):
        for p in params:
            p.grad = None
        if traced:
            return compiled(x0)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            out = compiled(x0)
        traced.append(True)
        return out
    return run


def make_steps(size: str, model_kind: str, backend: str = "cpu", device="cpu"):
    """(fused, eager): zero-argument compiled training steps at ``size`` with the same model:
    fastddpm's ``DenoiseDiffusion.loss`` on ``backend``, and labml's ``LabmlDiffusion.loss``."""
    inp = B.Inputs(B.SIZES[size], device)
    model = make_model(model_kind, inp.shape[1]).to(inp.device)
    fused = compile_training_step(DenoiseDiffusion(model, B.N_STEPS, inp.device, backend=backend).loss,
                                  model.parameters())
    eager = compile_training_step(LabmlDiffusion(model, B.N_STEPS, inp.device).loss, model.parameters())
    return (lambda: fused(inp.x0)), (lambda: eager(inp.x0))


def measure(size: str, model_kind: str, rounds: int, backend: str = "cpu"):
    """((fused median s, spread), (eager median s, spread)), timed interleaved as goals.py does.

    Dynamo's caches are reset first: every step is the same code object (``training_step``'s
    ``step``), whose compiled entries, one per loss and model, would otherwise pile up to
    ``torch._dynamo.config.recompile_limit`` over the rows."""
    torch._dynamo.reset()
    fns = list(make_steps(size, model_kind, backend))
    timing.warm_up(fns, 3)  # the first call compiles
    number = timing.calls_per_sample(fns, SAMPLE_S)
    samples = timing.time_interleaved(fns, warmup=0, min_time=0.0, min_rounds=rounds, max_rounds=rounds,
                                      number=number)
    return [(timing.median(ts), timing.spread(ts)) for ts in samples]


def goal_rows(rounds: int, fused: str = "fastddpm-cpu", sizes=SIZES, models=MODELS):
    """The goals table's rows (goals.py's columns), one per model and size, yielded as measured."""
    backend = fused.removeprefix("fastddpm-")
    for model_kind in models:
        for size in sizes:
            (f_s, f_spread), (e_s, e_spread) = measure(size, model_kind, rounds, backend)
            ratio = f_s / e_s
            yield (f"| {NAME} ({model_kind} model) | {size} | {f_s * 1e3:.3f} ms ({fused}, compiled) | "
                   f"compile (labml) | {e_s * 1e3:.3f} ms | {ratio:.3f} | {f_spread:.0%} / {e_spread:.0%} | "
                   f"<= {GOAL} | {'yes' if ratio <= GOAL else '**no**'} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds\n")
    print("| case | size | fused | baseline | baseline time | ratio | spread | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in goal_rows(args.rounds, sizes=args.sizes, models=args.models):
        print(row, flush=True)


if __name__ == "__main__":
    main()
