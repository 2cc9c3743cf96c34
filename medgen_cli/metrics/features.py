"""Feature networks for FID/KID/CMMD, loaded offline from files found by ``weights.resolve``.

An extractor maps a batch of grayscale slices ``(N, 1, H, W)`` (or ``(N, C, H, W)``; C > 1 is
averaged first) with values in [0, 1] to features ``(N, dim)`` float32. Preprocessing (SYSTEM.md §9)
is part of the extractor and written out in ``preprocessing``, which goes into every record and
every cache key:

* ``resnet50-imagenet`` — the reference's FID/KID network: torchvision's ResNet50 (``nets.ResNet50``,
  the same architecture and keys without importing torchvision), ImageNet weights ``IMAGENET1K_V1``
  (``resnet50-0676ba61.pth``), fc removed → 2048-d pooled features. Bilinear
  resize to 224×224 (align_corners False, no antialias), clamp to [0, 1], gray → 3 channels,
  ImageNet mean/std.
* ``biomedclip`` — the reference's CMMD network: the image tower of open_clip
  ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (512-d embedding, before
  L2 normalisation). Read from the snapshot folder (``open_clip_config.json`` +
  ``open_clip_pytorch_model.bin``); only the ``visual.*`` weights are loaded (no text tower, so no
  tokenizer or ``transformers`` is needed). Bilinear resize to the config's image size (224),
  clamp, gray → 3 channels, the config's mean/std (OpenAI CLIP's).
* ``radimagenet-resnet50`` — the reference's optional FID/KID network (``fid_radimagenet``): the
  RadImageNet ResNet50 (Keras architecture, ``nets.KerasResNet50``) from
  ``RadImageNet-ResNet50_notop.pth``, global average pool → 2048-d. Bilinear 224×224, clamp, gray →
  3 channels in BGR order, mean subtraction only (BGR means 0.406, 0.456, 0.485; no division),
  as MONAI's RadImageNet perceptual network preprocesses.
* ``inception-v3`` — the literature's FID network: Inception-v3 of the TensorFlow FID graph
  (``nets.FIDInception``) with ``pt_inception-2015-12-05-6726825d.pth``, 2048-d pool features.
  Bilinear 299×299 (align_corners False), clamp, gray → 3 channels, scaled to [−1, 1].
* ``inception-v3-torchvision`` — torchvision's ImageNet Inception3 (``inception_v3_google-0cc3c7bd.pth``),
  fc removed, same input scaling. Its features differ from the FID network's; never compare the two.

Precision: ``bf16`` autocast (the reference) on CUDA, ``fp32`` on the CPU, unless chosen.
Weights are read with ``torch.load(weights_only=True)`` (memory-mapped when the file allows) into a
network built on the meta device (no random initialisation); their sha256 is ``extractor.sha256``.

Speed: inside ``Extractor.graphed()`` a CUDA extractor captures its forward (resize, normalisation,
network) once per input shape in a CUDA graph and replays it: one launch instead of ~300 per batch.
The first replay of every graph is compared with the eager forward on the same batch; a difference
beyond ``GRAPH_TOLERANCE`` (relative to the features' scale), or any capture error, turns the graphs
off with a warning (``graph_info`` says what happened). ``warm(shape)`` captures a shape's graph in a
background thread while the caller reads its first files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError, UsageError, did_you_mean
from . import weights as W

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_config.json")
RESNET50_FILE = "resnet50-0676ba61.pth"
RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"
RADIMAGENET_BGR_MEAN = (0.406, 0.456, 0.485)
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
TV_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"

GRAPH_TOLERANCE = 1e-3  # graph replay vs eager forward: max |difference| / (1 + max |feature|)
MAX_GRAPHS = 4  # input shapes captured per extractor (tri-planar stacks and remainders need a few)
log = logging.getLogger("medgen")

EXTRACTORS = ("resnet50-imagenet", "biomedclip", "radimagenet-resnet50", "inception-v3", "inception-v3-torchvision")
DEFAULT_FOR = {"fid": "resnet50-imagenet", "kid": "resnet50-imagenet", "cmmd": "biomedclip"}


@dataclass
class Extractor:
    name: str
    dim: int
    net: object  # torch.nn.Module
    size: int
    mean: tuple
    std: tuple
    weights_path: str
    sha256: str
    precision: str
    device: object
    channels_last: bool = False
    note: str = ""
    use_graphs: bool = False
    graph_info: dict = field(default_factory=dict)
    _norm: dict = field(default_factory=dict, repr=False)
    _graphs: dict = field(default_factory=dict, repr=False)
    _warming: object = field(default=None, repr=False)  # a thread capturing a graph ahead (``warm``)

    @property
    def preprocessing(self) -> str:
        return (f"gray->3ch{self.note}; bilinear {self.size}x{self.size} (align_corners=False, no antialias); "
                f"clamp [0,1]; mean {list(self.mean)} std {list(self.std)}; {self.precision}")

    def __call__(self, x):
        """``(N, C, H, W)`` in [0, 1] → ``(N, dim)`` float32 on the extractor's device."""
        x = x.to(self.device, non_blocking=True).float()
        if x.shape[1] > 1:
            x = x.mean(1, keepdim=True)
        if self.use_graphs and self.device.type == "cuda":
            out = self._replay(x)
            if out is not None:
                return out
        return self._forward(x)

    def _forward(self, x):
        """Resize, clamp, normalise, network: ``(N, 1, H, W)`` float32 on the device → ``(N, dim)``."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = x.clamp(0, 1)
            if x.device not in self._norm:  # made once: a host→device copy per call would wait for the GPU
                self._norm[x.device] = (torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1),
                                        torch.tensor(self.std, device=x.device).view(1, 3, 1, 1))
            mean, std = self._norm[x.device]
            x = (x.expand(-1, 3, -1, -1) - mean) / std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                                cache_enabled=False):
                out = self.net(x)
            return out.float().flatten(1)

    def graphed(self, enabled: bool = True):
        """Context: calls replay CUDA graphs of the forward (module docstring); a no-op off CUDA."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            before = self.use_graphs
            self.use_graphs = enabled and self.device.type == "cuda" and not self.graph_info.get("off")
            try:
                yield self
            finally:
                self.use_graphs = before

        return ctx()

    def warm(self, shape) -> None:
        """Capture (and check) the graph for float32 inputs of ``shape`` in a background thread, so the
        capture overlaps the caller's reading; the next call waits for it. A no-op off CUDA, with
        graphs off, or when that graph exists."""
        import threading

        import torch

        key = (tuple(shape), torch.float32)
        if self.device.type != "cuda" or self.graph_info.get("off") or key in self._graphs or self._warming:
            return

        def work():
            with torch.cuda.device(self.device):
                gen = torch.Generator(self.device).manual_seed(0)
                self._capture(torch.rand(key[0], generator=gen, device=self.device))  # ends with a host sync

        self._warming = threading.Thread(target=work, name="medgen-graph-capture", daemon=True)
        self._warming.start()

    def _replay(self, x):
        """Features from the graph for ``x``'s shape (captured and checked on first sight), or None."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        g = self._graphs.get((tuple(x.shape), x.dtype))
        if g is not None:
            return g(x)
        return self._capture(x)

    def _capture(self, x):
        """Capture the graph for ``x``'s shape and check its replay against the eager forward: the
        replay's features (the eager ones if they differ), or None when capture is impossible."""
        key = (tuple(x.shape), x.dtype)
        if self.graph_info.get("off") or len(self._graphs) >= MAX_GRAPHS:
            return None
        try:
            g = _Graph(self._forward, x)
            got = g(x)
            eager = g.eager
            diff = float((got - eager).abs().max())
            scale = float(eager.abs().max())
        except Exception as exc:  # capture unsupported here: stay eager
            self.graph_info.update(off=f"capture failed: {type(exc).__name__}: {exc}")
            self.use_graphs = False
            log.warning("CUDA graph capture failed (%s); extracting features eagerly", exc)
            return None
        self.graph_info.setdefault("checks", []).append({"shape": list(key[0]), "max_abs_diff": diff,
                                                         "feature_max_abs": scale})
        if not diff <= GRAPH_TOLERANCE * (1.0 + scale):
            self.graph_info.update(off=f"replay differs from the eager forward by {diff:g}")
            self.use_graphs = False
            log.warning("CUDA graph replay differs from the eager forward (%g); extracting features eagerly", diff)
            return eager
        self._graphs[key] = g
        return got


class _Graph:
    """``fn`` on a fixed input shape captured in a CUDA graph (after two eager warm-up calls on a side
    stream, as torch.cuda.graph requires); ``eager`` is the last warm-up's output."""

    def __init__(self, fn, x):
        import torch

        self.inp = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager = fn(self.inp)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = fn(self.inp)

    def __call__(self, x):
        self.inp.copy_(x)
        self.graph.replay()
        return self.out.clone()


def _device(device):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _precision(precision, dev) -> str:
    if precision in (None, "auto"):
        return "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise UsageError(f"unknown precision '{precision}'", "--precision", "choose bf16 or fp32")
    return precision


def _resnet50(path: Path):
    from . import nets

    net = _build_into(nets.ResNet50, path, "a torchvision ResNet50",
                      f"torchvision's IMAGENET1K_V1 file {RESNET50_FILE}")
    return net, 2048, 224, IMAGENET_MEAN, IMAGENET_STD, ""


def _radimagenet(path: Path):
    from . import nets

    net = _build_into(nets.KerasResNet50, path, "the RadImageNet ResNet50 (Keras) architecture",
                      f"the original {RADIMAGENET_FILE}")
    return nets.GlobalPool(net), 2048, 224, RADIMAGENET_BGR_MEAN, (1.0, 1.0, 1.0), " (BGR)"


def _fid_inception(path: Path):
    from . import nets

    net = _build_into(nets.FIDInception, path, "the FID Inception-v3", f"the original {FID_INCEPTION_FILE}")
    return net, 2048, 299, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ""


def _build_into(make, path: Path, what: str, expected: str):
    """``make()`` with the file's weights assigned (``nets.build_loaded``); InputError when they do not fit."""
    from . import nets

    try:
        return nets.build_loaded(make, W.load_pickled_state(path))
    except RuntimeError as exc:
        raise InputError(f"weights do not fit {what}: {str(exc).splitlines()[0]}", path, f"use {expected}") from exc


def _tv_inception(path: Path):
    import torch
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    _load_into(net, path, "torchvision's Inception3", TV_INCEPTION_FILE)
    net.fc = torch.nn.Identity()
    return net, 2048, 299, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ""


def _load_into(net, path: Path, what: str, expected: str) -> None:
    from . import nets

    try:
        nets.load_strict(net, W.load_pickled_state(path))
    except RuntimeError as exc:
        raise InputError(f"weights do not fit {what}: {str(exc).splitlines()[0]}", path,
                         f"use the original {expected}") from exc


def _biomedclip(path: Path):
    from open_clip.model import _build_vision_tower

    cfg_path = path.parent / BIOMEDCLIP_FILES[1]
    try:
        cfg = json.loads(cfg_path.read_text())
        model_cfg = cfg["model_cfg"]
        vision_cfg = dict(model_cfg["vision_cfg"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"unreadable open_clip config: {exc}", cfg_path,
                         "the snapshot folder must hold the hub's open_clip_config.json") from exc
    vision_cfg["timm_model_pretrained"] = False  # never let timm fetch anything
    net = _build_vision_tower(model_cfg["embed_dim"], vision_cfg)
    _fit_input_size(net, vision_cfg.get("image_size", 224))
    state = W.load_pickled_state(path)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise InputError("no 'visual.*' weights in the file", path, "provide the open_clip checkpoint of BiomedCLIP")
    try:
        net.load_state_dict(visual, strict=True)
    except RuntimeError as exc:
        raise InputError(f"weights do not fit the config's image tower: {str(exc).splitlines()[0]}", path,
                         "config and weights must come from the same snapshot") from exc
    pre = cfg.get("preprocess_cfg", {})
    size = vision_cfg.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (net, int(model_cfg["embed_dim"]), int(size), tuple(pre.get("mean", CLIP_MEAN)),
            tuple(pre.get("std", CLIP_STD)), "")


def _warm_up(dev):
    """A thread that creates the CUDA context and loads cuDNN (seconds on a cold process), or None."""
    if dev.type != "cuda":
        return None
    import threading

    def work():
        import torch

        try:
            x = torch.zeros(1, 3, 8, 8, device=dev, dtype=torch.bfloat16)
            torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last),
                                       torch.zeros(4, 3, 3, 3, device=dev, dtype=torch.bfloat16))
            torch.cuda.synchronize(dev)
        except Exception:  # the real call reports any problem
            pass

    t = threading.Thread(target=work, name="medgen-cuda-warm-up", daemon=True)
    t.start()
    return t


def warm_linalg(dev):
    """A thread that loads the GPU linear-algebra libraries FID's eigendecompositions use, or None."""
    if dev is None or getattr(dev, "type", str(dev)) != "cuda":
        return None
    import threading

    def work():
        import torch

        try:
            a = torch.eye(4, dtype=torch.float64, device=dev)
            torch.linalg.eigvalsh(torch.linalg.eigh(a @ a)[1])
        except Exception:  # the real call reports any problem
            pass

    t = threading.Thread(target=work, name="medgen-linalg-warm-up", daemon=True)
    t.start()
    return t


def _fit_input_size(net, size) -> None:
    """timm towers are built at the model's default size; follow the config's image size."""
    trunk = getattr(net, "trunk", None)
    pe = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    want = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    if pe is not None and tuple(pe) != want and hasattr(net, "set_input_size"):
        net.set_input_size(want)


_SPECS: dict[str, tuple[tuple[str, ...], dict, Callable]] = {
    "resnet50-imagenet": ((RESNET50_FILE,), {"how": "download torchvision's ResNet50 IMAGENET1K_V1 weights "
                                                    f"({RESNET50_FILE}) on a connected machine"}, _resnet50),
    "biomedclip": (BIOMEDCLIP_FILES, {"hub_checkpoint": False, "hf_repo": BIOMEDCLIP_REPO,
                                      "how": f"on a connected machine run `huggingface-cli download {BIOMEDCLIP_REPO}` "
                                             "and copy the cache (or the snapshot folder)"}, _biomedclip),
    "radimagenet-resnet50": ((RADIMAGENET_FILE,), {"how": f"copy {RADIMAGENET_FILE} (the Warvito/radimagenet-models "
                                                          "release, as torch.hub caches it) from a connected machine"},
                             _radimagenet),
    "inception-v3": ((FID_INCEPTION_FILE,), {"how": f"copy {FID_INCEPTION_FILE} (the pytorch-fid release, as "
                                                    "torch.hub caches it) from a connected machine"}, _fid_inception),
    "inception-v3-torchvision": ((TV_INCEPTION_FILE,), {"how": "download torchvision's Inception3 IMAGENET1K_V1 "
                                                               f"weights ({TV_INCEPTION_FILE}) on a connected machine"},
                                 _tv_inception),
}


def check_name(name: str) -> None:
    if name not in _SPECS:
        close = did_you_mean(name, EXTRACTORS)
        raise UsageError(f"unknown feature extractor '{name}'", "--extractor",
                         f"{close + ' ' if close else ''}choose one of {', '.join(EXTRACTORS)}")


def find_weights(name: str, explicit=None) -> Path:
    check_name(name)
    files, kw, _ = _SPECS[name]
    return W.resolve(name, files, explicit, **kw)


def load(name: str, weights=None, device=None, precision=None, channels_last: bool | None = None) -> Extractor:
    """Build extractor ``name`` with weights found offline (``weights`` = --weights)."""
    import torch

    check_name(name)
    path = find_weights(name, weights)
    _, _, build = _SPECS[name]
    dev = _device(device)
    prec = _precision(precision, dev)
    warm = _warm_up(dev)  # the CUDA context and cuDNN load while the network is built and read
    net, dim, size, mean, std, note = build(path)
    if warm is not None:
        warm.join()
    cl = (dev.type == "cuda" and name != "biomedclip") if channels_last is None else channels_last
    net = net.eval().to(dev)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    return Extractor(name, dim, net, size, tuple(mean), tuple(std), str(path), W.sha256_file(path), prec, dev, cl,
                     note)
