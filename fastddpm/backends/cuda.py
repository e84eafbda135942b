"""The cuda backend (not built yet)."""
name = "cuda"
device_types = ("cuda",) if "cuda" != "triton" else ("cuda",)


def available():
    return False, "not implemented yet in this version of fastddpm"
