"""PyTorch bindings: ``batch_norm``, drop-in ``BatchNorm1d/2d/3d``, the fused
``BatchNormAct1d/2d/3d``, model conversion and folding.

CPU tensors run on the NumPy backends without copies; CUDA tensors run on the GPU backend.
``SyncBatchNorm`` and ``sync_batch_norm`` are imported on first use (they need
``torch.distributed``).
"""

from .convert import convert_model, fold_batchnorm
from .function import batch_norm
from .fuse import FuseReport, fuse
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FuseReport",
    "SyncBatchNorm",
    "batch_norm",
    "convert_model",
    "fold_batchnorm",
    "fuse",
    "sync_batch_norm",
]


def __getattr__(name: str):
    if name in ("SyncBatchNorm", "sync_batch_norm"):
        from . import sync

        return getattr(sync, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
