"""The cpu backend (not built yet)."""
name = "cpu"
device_types = ("cpu",) if "cpu" != "triton" else ("cuda",)


def available():
    return False, "not implemented yet in this version of fastddpm"
