"""The triton backend (not built yet)."""
name = "triton"
device_types = ("triton",) if "triton" != "triton" else ("cuda",)


def available():
    return False, "not implemented yet in this version of fastddpm"
