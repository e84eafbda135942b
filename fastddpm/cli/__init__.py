"""The ``fastddpm`` command: ``fastddpm demo`` and ``fastddpm bench``.

Errors a user can fix (a bad option, a backend that is not there, a missing optional package)
print one message and a hint, and exit with status 2; no traceback.
"""
import argparse
import sys

from .. import __version__

from ._common import BACKENDS, EXIT_USAGE, UsageError, parse_device  # noqa: F401  (re-exported)


def _int_at_least(lo):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _defaults(d, name):
    """A demo option's defaults as its help shows them: the full run's, then --smoke's."""
    from .demo import SMOKE
    return f"(default {getattr(d, name)}; {SMOKE[name]} with --smoke)"


def _add_demo(sub):
    from .demo import DemoConfig, SMOKE

    d = DemoConfig()
    p = sub.add_parser(
        "demo", help="train a small DDPM on 8x8 digits, sample it and report",
        description="Train a small eps-model with fastddpm.DenoiseDiffusion on scikit-learn's 8x8 digits "
                    "(no download), keeping an exponential moving average (EMA) of its weights (--ema-decay). "
                    "Sample the trained weights and their EMA each with the full DDPM chain (all --n-steps "
                    "steps) and with DDIM (eta 0, --ddim-steps steps), and the untrained model with DDPM; "
                    "score every set against held-out digits (classifier confidence, and MMD^2, an unbiased "
                    "estimate that can dip below 0 for sets as close to the held-out digits as real ones); "
                    "write a sample grid, a loss curve, samples.npy (the EMA weights' DDPM samples) and a JSON "
                    "summary. Also prints the training throughput of the fused and the reference backends. "
                    "Run it under `torchrun --nproc_per_node=N -m fastddpm demo` for data-parallel training.")
    # The options whose default --smoke changes: None until the run picks the full or smoke value.
    for flag, kind, text in (
            ("--steps", _int_at_least(1), "training steps"),
            ("--batch-size", _int_at_least(1), "global batch size, split over torchrun processes"),
            ("--n-steps", _int_at_least(2), "diffusion steps T of the schedule trained on; the DDPM chains sample "
                                            "all T, DDIM --ddim-steps of them"),
            ("--width", _int_at_least(2), "channels of the TinyUNet's first level"),
            ("--sample-count", _int_at_least(2), "images to generate"),
            ("--burst-steps", _int_at_least(1), "timed training steps per backend in the throughput comparison"),
            ("--ddim-steps", _int_at_least(1), "DDIM (eta 0) steps sampled beside the full DDPM chain"),
            ("--dpm-steps", _int_at_least(1), "DPM-Solver++ 2M steps sampled beside them")):
        p.add_argument(flag, type=kind, default=None, help=f"{text} {_defaults(d, flag[2:].replace('-', '_'))}")
    p.add_argument("--lr", type=_positive_float, default=d.lr,
                   help=f"Adam learning rate, cosine-decayed (default {d.lr})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help=f"decay of the exponential moving average (EMA) of the weights, which is sampled too "
                        f"(default {d.ema_decay})")
    p.add_argument("--seed", type=_int_at_least(0), default=d.seed,
                   help=f"seed of everything random; the same seed reproduces the run (default {d.seed})")
    p.add_argument("--device", default=d.device,
                   help=f"auto (a GPU when present), cpu, cuda or cuda:N (default {d.device})")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help=f"fastddpm backend for training and sampling (default {d.backend})")
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"output folder (default {d.out})")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run with a tiny model (tests, a quick look); explicit options win")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    try:
        from . import demo
        import matplotlib, sklearn, tqdm  # noqa: F401,E401  the demo's optional dependencies
    except ImportError as e:
        raise UsageError(f"the demo needs {e.name}: pip install 'fastddpm[demo]' "
                         "(tqdm, matplotlib, scikit-learn)") from None
    preset = demo.SMOKE if args.smoke else {}
    fields = {}
    for name in ("steps", "batch_size", "n_steps", "width", "sample_count", "burst_steps", "ddim_steps", "dpm_steps"):
        value = getattr(args, name)
        if value is None:
            value = preset.get(name, getattr(demo.DemoConfig, name))
        fields[name] = value
    cfg = demo.DemoConfig(lr=args.lr, ema_decay=args.ema_decay, seed=args.seed, device=args.device,
                          backend=args.backend,
                          out=args.out, progress=not args.no_progress, **fields)
    try:
        demo.run(cfg)
    except demo.DemoError as e:
        raise UsageError(str(e)) from None


def _csv(text):
    return [item for item in text.split(",") if item]


def _add_bench(sub):
    from . import bench
    from .bench import cases as B

    p = sub.add_parser(
        "bench", help="time the fused ops and DDIM steps against eager PyTorch, torch.compile and diffusers",
        description="Time every op x size x provider of fastddpm.cli.bench.cases in one run: fastddpm's available "
                    "backends, the eager labml-style code, torch.compile of it, diffusers' DDPMScheduler and "
                    "DDIMScheduler (provider diffusers) and fastddpm's drop-in ones called the same way "
                    "(fastddpm-diffusers; both when diffusers is installed), and a copy_ as the bandwidth "
                    "yardstick. The sampler cases time one DDIM step (plain, clipped, thresholded, guided) and a "
                    "whole 50-step DDIM loop. Prints median times, the ratio to eager, GB/s (also as a fraction "
                    "of the copy's) and each row's spread (IQR / median), with a warning where a row or the copy "
                    "is unstable or the copy was beaten (then its figures are marked invalid); an unstable row "
                    "gets no ratio to eager. A stalled CPU thread pool (medians on multiples of a timer tick, or "
                    "the copy with torch's threads far slower than on one thread, timed once more to tell) is said, "
                    "with the advice to rerun with --threads 1. Progress goes to stderr (plain lines when it is not a "
                    "terminal), the table to stdout.")
    p.add_argument("--quick", action="store_true",
                   help=f"one size ({', '.join(bench.QUICK['sizes'])}) and short timings (12 s measured on an idle "
                        "2-vCPU AMD EPYC VM, 46 s on the same VM shared with other work)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--sizes", type=_csv, default=None,
                   help="comma-separated sizes: " + ", ".join(f"{k} {tuple(v)}" for k, v in B.SIZES.items())
                        + " (default all; --quick: " + ",".join(bench.QUICK["sizes"]) + ")")
    p.add_argument("--cases", type=_csv, default=None,
                   help="comma-separated ops (default all): " + ", ".join(c for c in B.CASES if c != "copy"))
    p.add_argument("--providers", type=_csv, default=None,
                   help="comma-separated providers (default all installed): "
                        + ", ".join(n for n, pr in B.PROVIDERS.items() if "copy" not in pr.cases))
    p.add_argument("--min-time", type=_positive_float, default=None,
                   help=f"seconds of timing per row (default {bench.FULL['min_time']}; --quick "
                        f"{bench.QUICK['min_time']})")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default torch's; 1 on a small shared VM, where a 2-thread pool stalls)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args):
    from . import bench

    try:
        bench.main(device=args.device, sizes=args.sizes, cases=args.cases, providers=args.providers,
                   quick=args.quick, min_time=args.min_time, json_path=args.json, threads=args.threads)
    except bench.BenchError as e:
        raise UsageError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastddpm", description="Fused DDPM kernels for PyTorch: a training demo and benchmarks.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..backends import BackendUnavailableError

    try:
        args.func(args)
    except BackendUnavailableError as e:
        hint = "run `python -c 'import fastddpm; print(fastddpm.available_backends())'` to list what is " \
               "available, or pass --backend auto"
        print(f"fastddpm {args.command}: error: {e}\n  hint: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
