"""LPIPS (the standard one: Zhang et al. 2018, AlexNet backbone, linear layers v0.1), offline.

The ``lpips`` package ships its linear-layer weights; the AlexNet backbone is torchvision's
``alexnet-owt-7be5be79.pth``, found by ``weights.resolve`` (``--weights``/``$MEDGEN_WEIGHTS_ALEXNET``/
torch hub cache) and read with ``torch.load(weights_only=True)``. Images in [0, 1] are clamped,
mapped to [−1, 1] and repeated to 3 channels; volumes ``(B, C, D, H, W)`` are scored per axial
slice and averaged per volume. ``lpips`` is *not* the reference's "LPIPS" (a RadImageNet
perceptual loss; SYSTEM.md §12 item 10).
"""

from __future__ import annotations

from ..errors import InputError
from . import weights as W

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_PREPROCESSING = "clamp [0,1] -> [-1,1]; gray->3ch; no resize; 3D: axial slices, mean per volume"
_NETS: dict = {}


def _path(weights=None):
    return W.resolve("alexnet", (ALEXNET_FILE,), weights,
                     how=f"download torchvision's AlexNet weights ({ALEXNET_FILE}) on a connected machine")


def lpips_sha256(weights=None) -> str:
    return W.sha256_file(_path(weights))


def lpips_net(weights=None, device="cpu"):
    import lpips

    path = _path(weights)
    key = (str(path), str(device))
    if key in _NETS:
        return _NETS[key]
    net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    state = W.load_pickled_state(path)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    slices = {0: 1, 1: 1, 3: 2, 4: 2, 6: 3, 8: 4, 10: 5}  # torchvision features index → lpips slice
    mapped = {}
    for k, v in feats.items():
        idx, rest = k.split(".", 1)
        mapped[f"slice{slices[int(idx)]}.{idx}.{rest}"] = v
    try:
        net.net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise InputError(f"weights do not fit torchvision AlexNet: {str(exc).splitlines()[0]}", path,
                         f"use torchvision's {ALEXNET_FILE}") from exc
    net = net.eval().to(device)
    _NETS[key] = net
    return net


def lpips_alex(gen, ref, weights=None, chunk: int = 32):
    """Per-sample LPIPS ``(B,)`` of 2D ``(B, C, H, W)`` or 3D ``(B, C, D, H, W)`` batches."""
    import torch

    net = lpips_net(weights, gen.device)

    def prep(x):
        x = x.float().clamp(0, 1)
        x = x.mean(1, keepdim=True) if x.shape[1] > 1 else x
        return (x * 2 - 1).expand(-1, 3, -1, -1)

    def score(a, b):
        with torch.no_grad():
            return torch.cat([net(prep(a[i:i + chunk]), prep(b[i:i + chunk])).flatten()
                              for i in range(0, a.shape[0], chunk)])

    return slicewise(score, gen, ref)


# ---- the reference's "LPIPS": MONAI PerceptualLoss with the RadImageNet ResNet50 ---------------
RADIMAGENET_PREPROCESSING = ("clamp [0,1]; gray->3ch (BGR), minus BGR means [0.406, 0.456, 0.485]; no resize; "
                             "RadImageNet ResNet50 last-stage maps, unit-normalised over channels (eps 1e-10 in "
                             "the root); squared difference summed over channels, mean over space; fp32; "
                             "3D: axial slices in chunks of 32, mean over all slices of a volume")
_RADNETS: dict = {}


def radimagenet_path(weights=None):
    from .features import find_weights

    return find_weights("radimagenet-resnet50", weights)


def radimagenet_sha256(weights=None) -> str:
    return W.sha256_file(radimagenet_path(weights))


def radimagenet_net(weights=None, device="cpu"):
    """The Keras-architecture ResNet50 (feature maps, no pooling) with the RadImageNet weights, cached."""
    from . import nets
    from .features import RADIMAGENET_FILE, _load_into

    path = radimagenet_path(weights)
    key = (str(path), str(device))
    if key not in _RADNETS:
        net = nets.KerasResNet50()
        _load_into(net, path, "the RadImageNet ResNet50 (Keras) architecture", RADIMAGENET_FILE)
        for p in net.parameters():
            p.requires_grad_(False)
        _RADNETS[key] = net.eval().to(device)
    return _RADNETS[key]


def radimagenet_distance(net, a, b):
    """MONAI ``RadImageNetPerceptualSimilarity`` per 2D sample: ``(N, C, H, W)`` pairs in [0, 1] → ``(N,)``."""
    import torch

    from .features import RADIMAGENET_BGR_MEAN

    mean = torch.tensor(RADIMAGENET_BGR_MEAN, device=a.device).view(1, 3, 1, 1)

    def feats(x):
        x = x.float()
        x = x.mean(1, keepdim=True) if x.shape[1] > 1 else x
        f = net(x.expand(-1, 3, -1, -1) - mean)  # gray: RGB -> BGR is the identity
        return f / torch.sqrt((f * f).sum(1, keepdim=True) + 1e-10)

    with torch.no_grad():
        return ((feats(a) - feats(b)) ** 2).sum(1).mean((1, 2))


def perceptual_radimagenet(gen, ref, weights=None, chunk: int = 32):
    """Per-sample RadImageNet perceptual distance ``(B,)``; 3D ``(B, C, D, H, W)`` per axial slice, averaged."""
    import torch

    net = radimagenet_net(weights, gen.device)
    prep = lambda x: x.float().clamp(0, 1)  # noqa: E731

    def score(a, b):
        return torch.cat([radimagenet_distance(net, prep(a[i:i + chunk]), prep(b[i:i + chunk]))
                          for i in range(0, a.shape[0], chunk)])

    return slicewise(score, gen, ref)


def slicewise(score, gen, ref):
    """score(a, b) -> (N,) on 2D batches; a 3D batch (B, C, D, H, W) is scored per axial slice, then
    averaged per volume -> (B,)."""
    if gen.ndim == 4:
        return score(gen, ref)
    b, c, d, h, w = gen.shape
    sl = lambda x: x.transpose(1, 2).reshape(b * d, c, h, w)  # noqa: E731  (B*D, C, H, W)
    return score(sl(gen), sl(ref)).reshape(b, d).mean(1)
