"""The demo's outputs: the output folder, the sample grid and loss plot, summary.json and the
lines printed at the end."""
import json
import os

import numpy as np

from .config import DemoError
from .train import LossAverage

SUMMARY = "summary.json"
SAMPLES_PNG = "samples.png"
LOSS_PNG = "loss.png"
SAMPLES_NPY = "samples.npy"
OUTPUTS = (SUMMARY, SAMPLES_PNG, LOSS_PNG, SAMPLES_NPY)
SAMPLES_NPY_RUN = "ema_ddpm"  # the samples that samples.npy holds: the EMA weights' DDPM chain


def make_output_folder(path: str, given: str):
    """Creates ``path`` (``given``: as the user wrote it); a file in the way is named."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        blocker = path
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        if os.path.exists(blocker) and not os.path.isdir(blocker):
            what = "it is a file" if blocker == path else f"{blocker} is a file"
            raise DemoError(f"--out {given}: cannot create the output folder, {what}") from None
        raise DemoError(f"--out {given}: cannot create the output folder ({e.strerror})") from None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(images: np.ndarray, cols: int) -> np.ndarray:
    """[N, 8, 8] -> one image with a 1-pixel gap, padded with blanks to full rows."""
    rows = -(-len(images) // cols)
    h, w = images.shape[1:]
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), np.nan)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = im
    return out


WEIGHTS = {"raw": "trained", "ema": "trained, EMA", "untrained": "untrained"}


def panel_title(name, run):
    """A samples.png panel's title: weights, sampler and steps, wall time, and the set's quality
    figures (classifier confidence and MMD^2), as the printed table has them."""
    q = run["quality"]
    return (f"{WEIGHTS[run['weights']]}, {run['sampler'].upper()} {run['steps']} steps, {run['wall_s']:.1f} s\n"
            f"confidence {q['classifier_confidence']:.3f}, MMD$^2$ {q['mmd2_to_held_out']:.4f}")


def save_samples_png(path, panels):
    """``panels``: [(title, [N, 8, 8] images in [-1, 1])], drawn side by side."""
    plt = _pyplot()
    cols = int(np.ceil(np.sqrt(max(len(p[1]) for p in panels))))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.6))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")  # NaN: the gaps of the grid
    for ax, (title, images) in zip(np.atleast_1d(axes), panels):
        ax.imshow(_grid(np.clip(images, -1, 1), cols), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_png(path, losses, title):
    plt = _pyplot()
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


def write_summary(out: str, summary: dict):
    with open(os.path.join(out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)


def report_lines(summary, out):
    q = summary["quality"]
    lines = [f"sample quality vs {summary['data']['held_out']} held-out digits "
             f"(classifier accuracy on them: {q['held_out_classifier_accuracy']:.3f}):",
             f"  {'':>18} {'confidence (higher=better)':>27} {'MMD^2 (lower=better)':>22}"]
    for key, label in (("untrained", "untrained model"), ("trained", "trained model"),
                       ("real_train_digits", "real digits")):
        lines.append(f"  {label:>18} {q[key]['classifier_confidence']:27.3f} {q[key]['mmd2_to_held_out']:22.4f}")
    # An unbiased estimate scatters around the true MMD^2, which is 0 for a set drawn as the
    # held-out digits are; so a set as good as real digits can score a little below 0.
    lines.append("  MMD^2 is an unbiased estimate: it scatters around 0, below it too, for sets as close as "
                 "real digits")
    lines.append(f"by weights and sampler (EMA decay {summary['ema']['decay']}):")
    lines.append(f"  {'':>18} {'steps':>6} {'wall s':>7} {'confidence':>11} {'MMD^2':>8}")
    for name, run in summary["sampling"].items():
        label = f"{run['weights']} {run['sampler']}"
        lines.append(f"  {label:>18} {run['steps']:6d} {run['wall_s']:7.1f} "
                     f"{run['quality']['classifier_confidence']:11.3f} {run['quality']['mmd2_to_held_out']:8.4f}")
    t, m = summary["timings"], summary["machine"]
    lines.append(f"trained {summary['config']['steps']} steps in {t['train_s']:.1f} s "
                 f"({summary['throughput']['train_steps_per_s']:.1f} steps/s), final loss "
                 f"{summary['final_loss_avg']:.4f}; sampled {summary['config']['n_steps']} steps in "
                 f"{t['sample_trained_s']:.1f} s; total {t['total_s']:.1f} s")
    lines.append(f"on {m.get('gpu') or m['cpu']}, {m['threads']} threads, CPU kernels {m['cpu_isa'] or 'not loaded'}")
    lines.append(f"wrote {', '.join(summary['outputs'])} to {out}")
    ema = summary["sampling"][SAMPLES_NPY_RUN]
    lines.append(f"  {SAMPLES_NPY}: the EMA weights' {ema['steps']}-step DDPM samples, float32 "
                 f"[{summary['config']['sample_count']}, 1, 8, 8], unclipped (the digits lie in [-1, 1])")
    return lines
