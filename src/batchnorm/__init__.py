"""batchnorm: batch normalization, exactly right and at the memory-bandwidth limit.

The public API (contract §6)::

    y, saved = forward_training(x, gamma, beta, eps=1e-5, mode="spatial", channel_axis=1, ...)
    y = forward_inference(x, gamma, beta, mean, var, ...)
    dx, dgamma, dbeta = backward(dy, x, gamma, saved, ...)

PyTorch layers live in :mod:`batchnorm.torch`. The contract they all keep (formulas, modes,
numeric rules, refused inputs, differences from torch.nn and cuDNN) is docs/contract.md.
"""

from ._api import SavedStats, backward, forward_inference, forward_training
from .backends import BackendUnavailable

__all__ = [
    "BackendUnavailable",
    "SavedStats",
    "backward",
    "forward_inference",
    "forward_training",
]
__version__ = "0.1.0"
