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
import time

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
    scheds = {"diffusers": diffusers.EulerAncestralDiscreteScheduler(), "fastddpm": fd.EulerAncestralDiscreteScheduler(),
              "fastddpm fused_noise": fd.EulerAncestralDiscreteScheduler(fused_noise=True)}
    for s in scheds.values():
        s.set_timesteps(20)
        s.is_scale_input_called = True  # (diffusers warns otherwise)
    t = scheds["diffusers"].timesteps[10]

    def euler_a(s):  # step 10 of 20, again and again
        g = torch.Generator().manual_seed(0)

        def call():
            s._step_index = 10
            if isinstance(s, fd.EulerAncestralDiscreteScheduler):
                s._fd_next = 10  # the drop-in checks that steps run in order
            return s.step(out, t, x, generator=g)
        return call
    yield "Euler-ancestral step (20 steps)", {k: euler_a(s) for k, s in scheds.items()}
    scheds = {"diffusers": diffusers.DDPMScheduler(), "fastddpm": fd.DDPMScheduler()}
    yield "add_noise, per-sample t", {k: (lambda s=s: s.add_noise(x, noise, t_batch)) for k, s in scheds.items()}
    yield "get_velocity, per-sample t", {k: (lambda s=s: s.get_velocity(x, noise, t_batch)) for k, s in scheds.items()}


PIPE_BATCH, PIPE_SIZE, PIPE_STEPS = 8, 32, 50


def pipeline_share(rounds=3):
    """{scheduler: (pipeline seconds, seconds inside scheduler.step)} of a DDIMPipeline with a small
    random UNet2DModel (3x32x32, batch 8, 50 steps, DDIM's defaults: eta 0, clip_sample=True),
    diffusers' scheduler against fastddpm's, taking turns; medians over ``rounds``."""
    unet = diffusers.UNet2DModel(sample_size=PIPE_SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    pipes, inside = {}, {}
    for name, cls in (("diffusers", diffusers.DDIMScheduler), ("fastddpm", fd.DDIMScheduler)):
        sched = cls()
        step = sched.step

        def timed_step(*a, _step=step, _name=name, **k):
            t0 = time.perf_counter()
            out = _step(*a, **k)
            inside[_name][-1] += time.perf_counter() - t0
            return out

        sched.step = timed_step
        pipes[name] = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
        pipes[name].scheduler = sched  # DDIMPipeline's __init__ converts any scheduler to diffusers' DDIM
        pipes[name].set_progress_bar_config(disable=True)
        inside[name] = []
    total = {name: [] for name in pipes}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            inside[name].append(0.0)
            t0 = time.perf_counter()
            pipe(batch_size=PIPE_BATCH, num_inference_steps=PIPE_STEPS, generator=torch.Generator().manual_seed(0),
                 output_type="np")
            total[name].append(time.perf_counter() - t0)
    return {name: (timing.median(total[name]), timing.median(inside[name])) for name in pipes}


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
        share = pipeline_share()
    print(f"\nDDIMPipeline, small random UNet2DModel, {PIPE_BATCH}x3x{PIPE_SIZE}x{PIPE_SIZE}, {PIPE_STEPS} steps "
          "(eta 0, clip_sample=True), medians of 3:\n")
    print("| scheduler | pipeline | in scheduler.step | step share |")
    print("|---|---|---|---|")
    for name, (whole, in_step) in share.items():
        print(f"| {name} | {whole * 1e3:.1f} ms | {in_step * 1e3:.2f} ms | {in_step / whole:.1%} |")


if __name__ == "__main__":
    main()
