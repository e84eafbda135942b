"""README's "Python API" gives the code's signatures: each documented `name(...)` is parsed as a
Python parameter list and compared with inspect.signature of the function it names (names,
kinds, defaults; annotations aside), so neither side can drift alone. A list that ends in
", ..." documents the leading parameters only."""
import inspect
import os
import re

import pytest
import torch

import fastddpm
import fastddpm.samplers
from fastddpm import ops, samplers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = fastddpm.DenoiseDiffusion


def _section(text, title):
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


with open(os.path.join(REPO, "README.md")) as f:
    API = _section(f.read(), "Python API")
# The class part, then the fused ops' paragraph (whose q_sample is fastddpm.ops').
CLASS_PART, OPS_PART = API.split("`fastddpm.ops` holds", 1)

# The name as the README writes it -> (the function, whether its first parameter is left out:
# self, or the diffusion that the method passes).
CLASS_API = {
    "fastddpm.DenoiseDiffusion": (D, False),
    "q_xt_x0": (D.q_xt_x0, True),
    "q_sample": (D.q_sample, True),
    "p_sample": (D.p_sample, True),
    "loss": (D.loss, True),
    "sampler": (D.sampler, True),
    "sample": (D.sample, True),
    "fastddpm.samplers.make_sampler": (samplers.make_sampler, False),
    "fastddpm.samplers.sample": (samplers.sample, False),
    "step": (samplers.Sampler.step, True),
    "predict_x0": (samplers.Sampler.predict_x0, True),
}
OPS_API = {name: (getattr(ops, name), False) for name in
           ("q_sample", "p_sample_step", "mse_per_sample", "mse_loss", "sample_t", "normal", "target_mse",
            "clipped_step")}

_SIGNATURE = re.compile(r"`([A-Za-z_][\w.]*)\(([^`]*?)\)(?:\s*->[^`]*)?`")


def documented(text):
    """[(name, parameter text)] of every `name(params)` in ``text`` (spans may break lines)."""
    return [(m.group(1), " ".join(m.group(2).split())) for m in _SIGNATURE.finditer(text)]


def parse(params):
    """(inspect.Signature of the documented parameters, whether they are only the leading ones)."""
    partial = params == "..." or params.endswith(", ...")
    params = params[:-len("...")].rstrip(", ") if partial else params
    namespace = {"torch": torch}
    exec(f"def f({params}): pass", namespace)  # the README's defaults are Python expressions
    return inspect.signature(namespace["f"]), partial


def _form(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def mismatch(name, params, func, drop_first):
    """Why README's ``name(params)`` differs from ``func``'s signature, or None."""
    doc, partial = parse(params)
    real = list(inspect.signature(func).parameters.values())
    real = _form(inspect.Signature(real[1:] if drop_first else real))
    doc = _form(doc)
    if partial:
        real = real[:len(doc)]
    if doc != real:
        return f"README documents {name}({params}) but the code has {func.__qualname__}{inspect.signature(func)}"
    return None


def _checked(part, api):
    found = [(name, params) for name, params in documented(part) if name in api]
    return found, {name for name, _ in found}


@pytest.mark.parametrize("part, api", [(CLASS_PART, CLASS_API), (OPS_PART, OPS_API)], ids=["class", "ops"])
def test_every_documented_signature_is_the_codes(part, api):
    found, names = _checked(part, api)
    assert names == set(api), f"README's Python API documents no signature of {sorted(set(api) - names)}"
    # `sample(..., progress=True)` is a call, not a signature: test_progress_is_an_option's.
    errors = [mismatch(name, params, *api[name]) for name, params in found if not params.startswith("...")]
    errors = [e for e in errors if e]
    assert not errors, "\n".join(errors)


def test_the_class_line_gives_the_schedules_and_the_objective_options():
    name, params = documented(CLASS_PART)[0]
    assert name == "fastddpm.DenoiseDiffusion"
    assert "prediction=" in params and "zero_terminal_snr=" in params
    for schedule in ('"linear"', '"cosine"', '"scaled_linear"', '"sigmoid"', "tensor of betas"):
        assert schedule in API, schedule
    loss = [p for n, p in documented(CLASS_PART) if n == "loss"]
    assert loss and "weighting=" in loss[0] and "min_snr_gamma=" in loss[0]


def test_progress_is_an_option():
    """`sample(..., progress=True)`: an option of fastddpm.samplers.sample, which the method takes."""
    assert "`sample(..., progress=True)`" in CLASS_PART
    assert inspect.signature(samplers.sample).parameters["progress"].default is False
    d = D(lambda x, t: 0 * x, 3)
    assert d.sample((2, 1), progress=True, steps=2, kind="ddim").shape == (2, 1)


# ---- the comparison itself fails on drift, either way ------------------------------------------

def _loss(self, x0, noise=None, *, t=None, weighting=None):
    pass


@pytest.mark.parametrize("params", [
    "x0, noise=None, *, t=None",                    # a parameter the code has is missing
    "x0, noise=None, *, t=None, weighting=None, gamma=5.0",  # one the code lacks
    "x0, noise=None, *, t=None, weighting=1",       # another default
    "x0, noise=None, t=None, weighting=None",       # keyword-only documented as positional
    "x0, *, noise=None, t=None, weighting=None",    # and the reverse
])
def test_a_drift_is_reported(params):
    assert mismatch("loss", params, _loss, True) is not None


def test_the_documented_and_the_real_agree():
    assert mismatch("loss", "x0, noise=None, *, t=None, weighting=None", _loss, True) is None
    assert mismatch("loss", "x0, noise=None, ...", _loss, True) is None  # the leading ones
    assert mismatch("loss", "x0, t=None, ...", _loss, True) is not None
