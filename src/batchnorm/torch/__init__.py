"""PyTorch bindings: ``batch_norm``, drop-in ``BatchNorm1d/2d/3d``, model conversion and folding.

CPU tensors run on the NumPy backends without copies; CUDA tensors run on the GPU backend.
``SyncBatchNorm`` is imported on first use (it needs ``torch.distributed``).
"""

from .convert import convert_model, fold_batchnorm
from .function import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert_model",
    "fold_batchnorm",
]


def __getattr__(name: str):
    if name == "SyncBatchNorm":
        from .sync import SyncBatchNorm

        return SyncBatchNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
