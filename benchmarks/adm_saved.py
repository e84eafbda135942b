"""Bytes that ADM's hybrid loss saves for its backward: eager ADM-style code against the fused ops.

    python benchmarks/adm_saved.py [--backend cpu] [--shape 64,4,32,32]

The loss runs under ``torch.autograd.graph.saved_tensors_hooks``; the model saves under its own
(identity) hooks, so only the diffusion's own tensors are seen. A saved tensor whose storage is
x0, the model output or a parameter costs nothing (it lives anyway); every other storage of at
least one x0's size is a full-size tensor the loss keeps until its backward, counted once.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from fastddpm.cli.bench import cases as B  # noqa: E402


class _Model(B.TwoChannelScaleModel):
    """The bench's 2C-channel model, its own saved tensors hidden; it records its output."""

    def forward(self, x, t):
        with torch.autograd.graph.saved_tensors_hooks(lambda v: v, lambda v: v):
            self.out = super().forward(x, t)
        return self.out


def saved_full_size(run, inp):
    """(count, bytes) of the new full-size storages saved for backward by ``run()``."""
    seen = {}

    def pack(v):
        seen.setdefault(v.untyped_storage().data_ptr(), v)
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loss = run()
    alive = {inp.x0_unit.untyped_storage().data_ptr(), inp.model2.out.untyped_storage().data_ptr(),
             inp.model2.w.untyped_storage().data_ptr()}
    new = [v for p, v in seen.items() if p not in alive and v.untyped_storage().nbytes() >= inp.x0_unit.nbytes]
    loss.backward()
    return len(new), sum(v.untyped_storage().nbytes() for v in new)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--shape", default="64,4,32,32")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    inp = B.Inputs(shape)
    inp.model2 = _Model()
    adm = B.AdmStyleDiffusion(B.N_STEPS)
    fused = B._adm_fused(args.backend, inp)  # runs the backward itself; re-done here under the hooks
    full = inp.x0_unit.nbytes
    eager_n, eager_b = saved_full_size(lambda: adm.training_losses(inp.model2, inp.x0_unit, inp.t)["loss"].mean(),
                                       inp)

    def fused_loss():
        captured = {}
        orig = B._backward
        B._backward = lambda loss, *leaves: captured.setdefault("loss", loss)
        try:
            fused()
        finally:
            B._backward = orig
        return captured["loss"]

    fused_n, fused_b = saved_full_size(fused_loss, inp)
    print(f"saved for backward at {shape} (one x0 = {full / 2**20:.2f} MiB), beyond x0, the model output and "
          f"the parameters:")
    print(f"  eager ADM-style code: {eager_n} full-size tensors, {eager_b / 2**20:.1f} MiB")
    print(f"  fastddpm ({args.backend}):     {fused_n} full-size tensors, {fused_b / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
