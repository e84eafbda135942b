"""Which backends the tests run on: shared by the test files that parametrise over backends."""
import os

import pytest
import torch

import fastddpm


def expected_backends():
    """Kernel backends CI must have (FASTDDPM_EXPECT_BACKENDS overrides): absent ones fail."""
    return [b for b in os.environ.get("FASTDDPM_EXPECT_BACKENDS", "cpu,triton").split(",") if b]


def kernel_backends():
    """Every kernel backend present, plus the expected ones (which fail in device_for if absent)."""
    present = [b for b in fastddpm.available_backends() if b != "reference"]
    return sorted(set(expected_backends()) | set(present))


def device_for(backend):
    """The first device whose tensors ``backend`` takes; fails (never skips) if none."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reasons = []
    for device in devices:
        try:
            fastddpm.backends.resolve(backend, torch.device(device))
            return torch.device(device)
        except fastddpm.BackendUnavailableError as e:
            reasons.append(str(e))
    pytest.fail(f"backend {backend!r} cannot run here: {'; '.join(reasons)}")


def cpu_backends():
    """Every available backend that takes CPU tensors (reference included)."""
    names = []
    for name in fastddpm.available_backends():
        try:
            fastddpm.backends.resolve(name, torch.device("cpu"))
        except fastddpm.BackendUnavailableError:
            continue
        names.append(name)
    return names
