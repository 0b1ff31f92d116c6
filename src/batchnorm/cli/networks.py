"""The workloads the commands measure: one table of shapes for every benchmark.

``RESNET50`` lists the batch-norm layers of ResNet-50 at 224x224 input as
``((channels, height = width), how many layers)``: 53 layers in all. At another input size
the spatial sizes scale with it (:func:`resnet50_shapes`).
"""

from __future__ import annotations

RESNET50 = [((64, 112), 1), ((64, 56), 6), ((256, 56), 4), ((128, 56), 1), ((128, 28), 7),
            ((512, 28), 5), ((256, 28), 1), ((256, 14), 11), ((1024, 14), 7), ((512, 14), 1),
            ((512, 7), 5), ((2048, 7), 4)]
# (group, shape): BatchNorm1d shapes, a few-channel stressor, and a tiny per-call probe
EXTRA = [("bn1d", (256, 4096)), ("bn1d", (4096, 256)), ("few-channel", (20, 6, 65536)),
         ("tiny", (8, 64, 8, 8))]


def resnet50_shapes(batch: int, image: int = 224) -> list[tuple[tuple[int, int, int, int], int]]:
    """``[((N, C, H, W), count)]`` of ResNet-50's BN layers for ``batch`` images of
    ``image`` x ``image`` pixels (the spatial sizes are 224's scaled by ``image / 224``)."""
    return [((batch, c, max(1, hw * image // 224), max(1, hw * image // 224)), n)
            for (c, hw), n in RESNET50]
