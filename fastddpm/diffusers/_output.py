"""diffusers' scheduler outputs (``BaseOutput`` dataclasses), built as their constructor builds
them but without its dataclass ``__init__`` and ``__post_init__``, which cost several
microseconds a step: a third of a drop-in's host work at a pipeline's latent size.

The state is the constructor's: every field an attribute, the fields that are not None the
items of the OrderedDict, in field order (tests compare the two for every output class used).
"""
import dataclasses
from collections import OrderedDict

_FIELDS = {}  # output class -> its field names, in order


def output(cls, **values):
    """``cls(**values)`` for a diffusers ``BaseOutput`` dataclass ``cls`` (every field given)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    out = cls.__new__(cls)
    attrs = out.__dict__
    for name in names:
        value = values[name]
        attrs[name] = value
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
    return out
