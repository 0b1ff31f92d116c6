"""The workloads the commands measure: one table of shapes for every benchmark.

``RESNET50`` lists the batch-norm layers of ResNet-50 at 224x224 input as
``((channels, height = width), how many layers)``: 53 layers in all. At another input size
the spatial sizes scale with it (:func:`resnet50_shapes`).
"""

from __future__ import annotations

RESNET50 = [((64, 112), 1), ((64, 56), 6), ((256, 56), 4), ((128, 56), 1), ((128, 28), 7),
            ((512, 28), 5), ((256, 28), 1), ((256, 14), 11), ((1024, 14), 7), ((512, 14), 1),
            ((512, 7), 5), ((2048, 7), 4)]
# How each of RESNET50's layers ends, by shape: "relu" (BN -> ReLU: the stem, and bn1 and bn2
# of every bottleneck), "add_relu" (BN -> add -> ReLU: bn3, which ends every bottleneck) and
# None (the shortcut's BN on downsampling blocks, added unfused): the fused forms the layers
# take when the model is fused (33, 16 and 4 layers).
RESNET50_EPILOGUES = {
    (64, 112): {"relu": 1}, (64, 56): {"relu": 6}, (256, 56): {"add_relu": 3, None: 1},
    (128, 56): {"relu": 1}, (128, 28): {"relu": 7}, (512, 28): {"add_relu": 4, None: 1},
    (256, 28): {"relu": 1}, (256, 14): {"relu": 11}, (1024, 14): {"add_relu": 6, None: 1},
    (512, 14): {"relu": 1}, (512, 7): {"relu": 5}, (2048, 7): {"add_relu": 3, None: 1},
}
# (group, shape): BatchNorm1d shapes, a few-channel stressor, and a tiny per-call probe
EXTRA = [("bn1d", (256, 4096)), ("bn1d", (4096, 256)), ("few-channel", (20, 6, 65536)),
         ("tiny", (8, 64, 8, 8))]


def resnet50_shapes(batch: int, image: int = 224) -> list[tuple[tuple[int, int, int, int], int]]:
    """``[((N, C, H, W), count)]`` of ResNet-50's BN layers for ``batch`` images of
    ``image`` x ``image`` pixels (the spatial sizes are 224's scaled by ``image / 224``)."""
    return [((batch, c, max(1, hw * image // 224), max(1, hw * image // 224)), n)
            for (c, hw), n in RESNET50]


def resnet50(classes: int = 1000):
    """The standard bottleneck ResNet-50 (v1.5: the stride on the 3x3 convolution), all
    ``torch.nn``: a 7x7/2 stem, 3 + 4 + 6 + 3 bottlenecks of widths 64..512 (expansion 4),
    global average pooling and a linear classifier. Its 53 ``BatchNorm2d`` follow their
    convolutions, which makes each BN input a tensor only that BN reads. ReLUs are not in
    place, so a BN's output is not overwritten (hooks on it stay meaningful).

    Input (N, 3, S, S) -> logits (N, classes); at S = 224 the BN inputs are
    :data:`RESNET50`'s shapes, at other S :func:`resnet50_shapes`'s.
    """
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int):
            super().__init__()
            cout = 4 * mid
            self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    layers, cin = [], 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = 4 * mid
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1), *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def build_net(width: int = 32, blocks: int = 2, classes: int = 10, in_channels: int = 3):
    """A small ResNet-style network, all ``torch.nn``: a conv-BN-ReLU stem, ``blocks``
    residual blocks (conv-BN-ReLU-conv-BN + skip, ReLU), global average pooling, and a
    Linear-BatchNorm1d-ReLU-Linear head. Input (N, in_channels, H, W) -> (N, classes).
    """
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(x + self.bn2(self.conv2(y)))

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                      nn.BatchNorm2d(width), nn.ReLU()),
        nn.Sequential(*[Block(width) for _ in range(blocks)]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Linear(width, 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU(),
                      nn.Linear(2 * width, classes)),
    )
