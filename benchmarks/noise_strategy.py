"""Where the noise of a CPU training step should be generated: regenerated in each kernel, or
drawn once and passed around.

    python benchmarks/noise_strategy.py [--threads 1 2] [--isas avx512 avx2] [--sizes cifar latent large]
                                        [--rounds 15]

The diffusion part of a training step with a one-parameter eps model (pred = w * x_t), on the
cpu backend, three ways, timed interleaved (each round times each once, in turn; medians):

- regenerate: q_sample draws its noise in-kernel; mse_per_sample(pred, target=None, seed) draws
  the same noise again forward and once more backward (nothing noise-sized is stored; the GPU
  default);
- materialise: noise = fastddpm.ops.normal (the same normals, drawn once), q_sample(noise=...)
  and mse_per_sample(pred, noise): one Philox/Box-Muller pass instead of three, one more tensor
  written and read twice;
- eager: labml's loss(x0) (fastddpm.cli.bench.baselines), torch.randn_like and F.mse_loss.

Each instruction set runs in its own process with ATEN_CPU_CAPABILITY set to it, so PyTorch's
own kernels (the eager code, torch.randn_like) and fastddpm's use the same one, as on a machine
that has only that instruction set.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from fastddpm import ops  # noqa: E402
from fastddpm.cli.bench import cases as B  # noqa: E402
from fastddpm.cli.bench.baselines import LabmlDiffusion  # noqa: E402

STRATEGIES = ("regenerate", "materialise", "eager")


def _step_fns(inp):
    tab, w, seed = inp.tables, inp.model.w, ops.draw_seed("cpu", torch.Generator().manual_seed(1))
    labml = LabmlDiffusion(inp.model, B.N_STEPS, inp.device)

    def regenerate():
        x_t = ops.q_sample(inp.x0, inp.t, tab["sqrt_ab"], tab["sqrt_1m_ab"], seed=seed, backend="cpu")
        return ops.mse_per_sample(x_t * w, seed=seed, backend="cpu").mean()

    def materialise():
        noise = ops.normal(inp.shape, seed=seed, backend="cpu")
        x_t = ops.q_sample(inp.x0, inp.t, tab["sqrt_ab"], tab["sqrt_1m_ab"], noise, backend="cpu")
        return ops.mse_per_sample(x_t * w, noise, backend="cpu").mean()

    def step(loss_fn):
        def run():
            w.grad = None
            loss_fn().backward()
        return run

    return {"regenerate": step(regenerate), "materialise": step(materialise),
            "eager": step(lambda: labml.loss(inp.x0))}


def _time(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(size, threads, rounds):
    """{strategy: (median, fastest) seconds} of one size at one thread count, in this process."""
    torch.set_num_threads(threads)
    fns = _step_fns(B.Inputs(B.SIZES[size]))
    for fn in fns.values():
        for _ in range(3):
            fn()
    number = max(1, int(0.02 / min(_time(fn, 1) for fn in fns.values())))
    times = {s: [] for s in fns}
    for _ in range(rounds):
        for s, fn in fns.items():
            times[s].append(_time(fn, number))
    return {s: (statistics.median(v), min(v)) for s, v in times.items()}


def _child(args):
    from fastddpm import _extension
    isa = _extension.load().cpu_isa()
    rows = []
    for threads in args.threads:
        for size in args.sizes:
            rows.append(dict(isa=isa, aten=torch.backends.cpu.get_cpu_capability(), threads=threads, size=size,
                             **measure(size, threads, args.rounds)))
    print(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isas", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--sizes", nargs="+", default=["cifar", "latent", "large"], choices=sorted(B.SIZES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    rows = []
    for isa in args.isas:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(args.rounds),
               "--threads", *map(str, args.threads), "--sizes", *args.sizes]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"torch {torch.__version__}, {args.rounds} interleaved rounds: medians (fastest round); load "
          f"average {os.getloadavg()[0]:.1f} at the end")
    print("| ISA (fastddpm / ATen) | threads | size | regenerate | materialise | eager labml "
          "| materialise / regenerate | materialise / eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(map(str, B.SIZES[r["size"]]))
        ms = {s: f"{r[s][0] * 1e3:.3f} ms ({r[s][1] * 1e3:.3f})" for s in STRATEGIES}
        ratio = {k: f"{r['materialise'][0] / r[k][0]:.2f} ({r['materialise'][1] / r[k][1]:.2f})"
                 for k in ("regenerate", "eager")}
        print(f"| {r['isa']} / {r['aten']} | {r['threads']} | {r['size']} {shape} | {ms['regenerate']} "
              f"| {ms['materialise']} | {ms['eager']} | {ratio['regenerate']} | {ratio['eager']} |")


if __name__ == "__main__":
    main()
