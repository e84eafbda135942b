"""fastddpm.diffusers' schedulers against diffusers' own: step, add_noise and get_velocity.

    python benchmarks/diffusers_adapter.py [--threads 1] [--rounds 15]

At (128, 3, 32, 32) float32 on the CPU. Each round times every scheduler of a case once, in
turn (fastddpm.cli.timing), so on a shared machine the ratios compare like with like; medians.
"step" cases take the generator path (diffusers' noise drawn with torch.randn in both, then
fed to the fused kernel), "fused_noise" draws it in-kernel instead.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffusers  # noqa: E402
import torch  # noqa: E402

import fastddpm.diffusers as fd  # noqa: E402
from fastddpm.cli import timing  # noqa: E402

SHAPE = (128, 3, 32, 32)
SAMPLE_S = 0.02  # each sample times enough back-to-back calls to last about this long


def step_call(sched, x, out, t, **kwargs):
    g = torch.Generator().manual_seed(0)
    return lambda: sched.step(out, t, x, generator=g, **kwargs)


def cases():
    """(name, {provider: callable}) of every case."""
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t_batch = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    for name, config, kwargs in [("DDPM step, clip_sample=False", dict(clip_sample=False), {}),
                                 ("DDPM step, clip_sample=True (default)", {}, {}),
                                 ("DDPM step, thresholding=True", dict(thresholding=True, sample_max_value=1.5), {}),
                                 ("DDIM step, eta=0, clip_sample=False", dict(clip_sample=False), {"eta": 0.0}),
                                 ("DDIM step, eta=0, clip_sample=True (default)", {}, {"eta": 0.0}),
                                 ("DDIM step, eta=1, clip_sample=False", dict(clip_sample=False), {"eta": 1.0})]:
        cls = "DDPMScheduler" if name.startswith("DDPM") else "DDIMScheduler"
        scheds = {"diffusers": getattr(diffusers, cls)(**config), "fastddpm": getattr(fd, cls)(**config),
                  "fastddpm fused_noise": getattr(fd, cls)(fused_noise=True, **config)}
        for s in scheds.values():
            s.set_timesteps(50)
        t = scheds["diffusers"].timesteps[10]
        yield name, {k: step_call(s, x, out, t, **kwargs) for k, s in scheds.items()}
    scheds = {"diffusers": diffusers.DDPMScheduler(), "fastddpm": fd.DDPMScheduler()}
    yield "add_noise, per-sample t", {k: (lambda s=s: s.add_noise(x, noise, t_batch)) for k, s in scheds.items()}
    yield "get_velocity, per-sample t", {k: (lambda s=s: s.get_velocity(x, noise, t_batch)) for k, s in scheds.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{SHAPE} float32, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| case | diffusers | fastddpm | ratio | fastddpm fused_noise | ratio |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, fns in cases():
            timing.warm_up(list(fns.values()), 3)
            number = timing.calls_per_sample(list(fns.values()), SAMPLE_S)
            samples = timing.time_interleaved(list(fns.values()), warmup=0, min_time=0.0, min_rounds=args.rounds,
                                              max_rounds=args.rounds, number=number)
            med = {k: timing.median(ts) for k, ts in zip(fns, samples)}
            base = med["diffusers"]
            cells = [f"{base * 1e3:.3f} ms"]
            for k in ("fastddpm", "fastddpm fused_noise"):
                cells += [f"{med[k] * 1e3:.3f} ms", f"{med[k] / base:.2f}"] if k in med else ["", ""]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
