"""Memory format of the ops' results: the input's, as torch's own elementwise ops keep it.

The kernels compute on the contiguous (logical, row-major) layout, because the noise contract
indexes elements in that order; :func:`like` then gives the result the input's memory format,
so a channels_last batch stays channels_last through q_sample, p_sample and the samplers.
"""
import torch


def like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` (same shape as ``x``) in ``x``'s memory format: channels_last for a 4-D ``x`` in
    channels_last, channels_last_3d for a 5-D one, else ``y`` as it is.

    A contiguous ``x`` (the usual case) costs one stride check. A tensor that is both contiguous
    and channels_last (one channel, or 1x1 images) counts as contiguous, as torch's
    ``suggest_memory_format`` has it. Other strided layouts get ``y`` as the backend returned it.
    """
    if x.is_contiguous():
        return y
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y
