"""Feature networks, written here so that the evaluation never imports torchvision (seconds of start-up).

* ``ResNet50`` — torchvision's ``resnet50`` (ResNet v1.5: the stride on the 3×3 convolution of a
  bottleneck; convolutions without bias; batch-norm eps 1e-5), with torchvision's state-dict keys
  (``conv1``, ``bn1``, ``layerK.i.convJ``/``bnJ``, ``layerK.0.downsample.{0,1}``, ``fc``), so
  ``resnet50-0676ba61.pth`` loads strictly. The forward returns the 2048-d global average pool (the
  FID/KID features; ``fc`` is kept only so that the file loads strictly). The same operations in the
  same order as torchvision's forward, so the same numbers (a test checks it on random weights).
* ``KerasResNet50`` — the ResNet50 of Keras (``keras.applications``), the one RadImageNet trained and
  ``RadImageNet-ResNet50_notop.pth`` (a Keras → PyTorch conversion) holds: every convolution has a
  bias, batch-norm eps is 1.001e-5, and a bottleneck's stride sits on its first 1×1 convolution (not
  on the 3×3 as in torchvision). State-dict keys follow torchvision's naming (``conv1``, ``bn1``,
  ``layerK.i.convJ``/``bnJ``, ``layerK.0.downsample.{0,1}``), without ``fc`` ("notop"). The forward
  returns the last stage's feature map ``(N, 2048, h, w)``.
* ``FIDInception`` — Inception-v3 as the TensorFlow FID graph (2015-12-05) computes it, for the
  ported ``pt_inception-2015-12-05-6726825d.pth``. It differs from torchvision's Inception3 in its
  pooling: the average-pool branches of the 35×35, 17×17 and first 8×8 blocks exclude the zero
  padding from the average, and the last 8×8 block pools its branch with a max, not an average.
  Keys are torchvision's (``Conv2d_1a_3x3.conv``/``.bn``, ``Mixed_5b`` … ``Mixed_7c``, ``fc`` with
  1008 classes, no auxiliary head). The forward returns the 2048-d global average pool.

All are written here from the published architectures; no weights are fetched. ``build_loaded``
builds one on the meta device (no random initialisation) and assigns the file's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- torchvision ResNet50
class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(4 * width)) if stride != 1 or cin != 4 * width else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for k, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layer = []
            for i in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
            setattr(self, f"layer{k}", nn.Sequential(*layer))
        self.fc = nn.Linear(2048, num_classes)  # kept so that the file loads strictly; unused

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# ----------------------------------------------------------------------------- Keras ResNet50
class _KerasBottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        eps = 1.001e-5
        self.conv1 = nn.Conv2d(cin, width, 1, stride=stride)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, 4 * width, 1)
        self.bn3 = nn.BatchNorm2d(4 * width, eps=eps)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride=stride), nn.BatchNorm2d(4 * width, eps=eps))
                           if project else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class KerasResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5)
        cin = 64
        for k, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layer = []
            for i in range(blocks):
                layer.append(_KerasBottleneck(cin, width, stride if i == 0 else 1, project=i == 0))
                cin = 4 * width
            setattr(self, f"layer{k}", nn.Sequential(*layer))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)  # after ReLU: same as Keras' zero padding + valid pool
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class GlobalPool(nn.Module):
    """``net`` followed by a global average pool → ``(N, C)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).mean((2, 3))


# ----------------------------------------------------------------------------- FID Inception-v3
class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU — keys ``.conv`` and ``.bn``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_no_pad(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block35(nn.Module):  # "Mixed_5x"
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_no_pad(x))], 1)


class _Reduce35(nn.Module):  # "Mixed_6a"
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _Block17(nn.Module):  # "Mixed_6b..6e"
    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, mid, 1)
        self.branch7x7_2 = _Conv(mid, mid, row[0], padding=row[1])
        self.branch7x7_3 = _Conv(mid, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _Conv(cin, mid, 1)
        self.branch7x7dbl_2 = _Conv(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_3 = _Conv(mid, mid, row[0], padding=row[1])
        self.branch7x7dbl_4 = _Conv(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_5 = _Conv(mid, 192, row[0], padding=row[1])
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b, d, self.branch_pool(_avg_no_pad(x))], 1)


class _Reduce17(nn.Module):  # "Mixed_7a"
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        c = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), c, F.max_pool2d(x, 3, stride=2)], 1)


class _Block8(nn.Module):  # "Mixed_7b" (average pool without padding) and "Mixed_7c" (max pool)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_no_pad(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


class FIDInception(nn.Module):
    """Inputs ``(N, 3, 299, 299)`` in [−1, 1] → pool features ``(N, 2048)``."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _Block35(192, 32)
        self.Mixed_5c = _Block35(256, 64)
        self.Mixed_5d = _Block35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Block17(768, 128)
        self.Mixed_6c = _Block17(768, 160)
        self.Mixed_6d = _Block17(768, 160)
        self.Mixed_6e = _Block17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Block8(1280, max_pool=False)
        self.Mixed_7c = _Block8(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)  # kept so that the file loads strictly; unused

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def build_loaded(make, state: dict) -> nn.Module:
    """``make()`` built on the meta device (no random initialisation), then ``state`` assigned strictly
    (``load_strict``); a missing ``num_batches_tracked`` becomes 0 and every tensor keeps the module's
    dtype, as ``load_state_dict`` into an initialised module would give."""
    with torch.device("meta"):
        net = make()
    want = net.state_dict()
    state = dict(state)
    for k, v in want.items():
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=v.dtype)
        elif k in state and isinstance(state[k], torch.Tensor) and state[k].dtype != v.dtype:
            state[k] = state[k].to(v.dtype)
    load_strict(net, state, assign=True)
    return net


def load_strict(net: nn.Module, state: dict, assign: bool = False) -> None:
    """``load_state_dict`` that tolerates only missing ``num_batches_tracked`` buffers (older exports)."""
    missing, unexpected = net.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise RuntimeError("; ".join(parts))
