"""The built-in models of ``spar train`` and the glue to timm's models.

Each built-in is written once as a plain torch network (``cnn``, ``mlp``, ``resnet20``,
``vit_tiny``); :func:`build` makes it Bayesian with :func:`spar.nn.bayesianize`
(``sample_wise=True``: every Linear/Conv becomes a mean-field Gaussian layer, every
BatchNorm/Dropout a sample-wise one). The settings follow the Bayesian CNN/ViT experiments
on CIFAR-10 of arXiv 2604.04736:

============  ===============================================================================
``cnn``       the digits CNN of ``spar train`` (two 3x3 convs, max-pool, two linear layers),
              for any ``(C, H, W)`` with ``H, W >= 2``
``mlp``       two hidden layers of 256 (ReLU) on feature vectors ``(D,)`` (images flattened)
``resnet20``  the CIFAR ResNet-20 of He et al. 2016, for ``(C, H, W)`` with ``H, W >= 4``
``vit-tiny``  ViT-Tiny (dim 192, depth 12, 3 heads, patch 4), ``H`` and ``W`` divisible by 4
``timm:NAME`` any model of timm (an optional extra): ``timm.create_model(NAME)``
============  ===============================================================================

Folded batch. :class:`spar.nn.MonteCarlo` hands the model the shared ``(B, ...)`` input;
the first Bayesian layer returns ``(S*B, ...)``. All built-ins start with a Bayesian
layer (``mlp``: after a flatten), so no module mixes a tensor from before that layer with
one after it. Bayesian linear layers take ``(S*B, ..., K)`` like ``nn.Linear`` (the
transformer's tokens ``(S*B, N, D)``; timm's transformers too): each token row keeps its
sample's weights.

This module imports torch and :mod:`spar.nn` only; timm is imported when a ``timm:``
model is built.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spar.nn

MODELS = ("cnn", "mlp", "resnet20", "vit-tiny")  # plus "timm:NAME"
TIMM_PREFIX = "timm:"

__all__ = [
    "MODELS",
    "ModelError",
    "build",
    "cnn",
    "describe",
    "mlp",
    "resnet20",
    "vit_tiny",
]


class ModelError(ValueError):
    """A model that cannot be built: an unknown name, an input shape the model cannot
    take, or a ``timm:`` model when timm is missing or does not know the name. The message
    is one line, fit for a command-line error."""


# --------------------------------------------------------------------------- checks


def _shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ModelError(
            f"input_shape must be a tuple of ints (C, H, W) or (D,), got {input_shape!r}"
        ) from None
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape
    ):
        raise ModelError(
            f"input_shape must be a non-empty tuple of ints >= 1 (without the batch), "
            f"got {input_shape!r}"
        )
    return shape


def _classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def _image(model: str, input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)`` with ``H, W >= min_side``, else a ModelError."""
    shape = _shape(input_shape)
    if len(shape) != 3 or min(shape[1:]) < min_side:
        raise ModelError(
            f"model {model!r} needs image inputs (C, H, W) with H, W >= {min_side}, "
            f"got input shape {shape}"
        )
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------- cnn, mlp


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The digits CNN of ``spar train`` for images ``(C, H, W)``, ``H, W >= 2``:
    Conv(C, 16, 3, p1)-ReLU-Conv(16, 32, 3, p1)-ReLU-MaxPool(2)-Flatten-
    Linear(32 (H//2) (W//2), 64)-ReLU-Linear(64, num_classes).

    For ``(1, 8, 8)`` and 8 classes it is module for module the network that ``spar
    train``'s ``digits_cnn`` built before models became an option (same ``state_dict`` keys,
    same initial parameters from the same seed), so its checkpoints load."""
    C, H, W = _image("cnn", input_shape, 2)
    K = _classes(num_classes)
    return nn.Sequential(
        nn.Conv2d(C, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (H // 2) * (W // 2), 64),
        nn.ReLU(),
        nn.Linear(64, K),
    )


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256)
) -> nn.Module:
    """A ReLU MLP for feature vectors ``(D,)``: Flatten-Linear(D, h1)-ReLU-...-
    Linear(h_last, num_classes). Any other input shape is flattened (D = its product).

    hidden: the widths of the hidden layers (default two of 256)."""
    D = math.prod(_shape(input_shape))
    K = _classes(num_classes)
    hidden = tuple(hidden)
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ModelError(f"mlp hidden widths must be ints >= 1, got {hidden!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for k, n in zip((D, *hidden[:-1]), hidden, strict=True):
        layers += [nn.Linear(k, n), nn.ReLU()]
    layers.append(nn.Linear(hidden[-1] if hidden else D, K))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- resnet20


class BasicBlock(nn.Module):
    """The basic block of a CIFAR ResNet: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut,
    then ReLU. A block that changes the stride or the width has a projection shortcut,
    a 1x1 conv with BN (option B of He et al. 2016); the others the identity."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 conv stem of 16 channels with
    BN and ReLU, three stages of ``blocks`` basic blocks (16, 32, 64 channels, strides 1,
    2, 2), global average pooling and a linear head. Depth ``6 * blocks + 2``."""

    def __init__(self, in_channels: int, num_classes: int, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, width = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            layer = []
            for i in range(blocks):
                layer.append(BasicBlock(width, channels, stride if i == 0 else 1))
                width = channels
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He initialisation, as in the paper
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 for images ``(C, H, W)``, ``H, W >= 4`` (made for 32x32 CIFAR-10): 3
    stages of 3 basic blocks, 16/32/64 channels, strides 1/2/2, BatchNorm, global average
    pooling, linear head; projection shortcuts (1x1 conv + BN, option B) where the shape
    changes. 0.27 M weights at 10 classes."""
    C, _, _ = _image("resnet20", input_shape, 4)
    return ResNet(C, _classes(num_classes), blocks=3)


# --------------------------------------------------------------------------- vit-tiny


class Attention(nn.Module):
    """Multi-head self-attention on ``(N, T, dim)``: ``qkv`` and ``proj`` are plain
    ``nn.Linear`` layers (which bayesianize converts; ``nn.MultiheadAttention`` keeps its
    input projection as a raw parameter), the attention is
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ModelError(f"vit dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, D / heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(N, T, D))


class MLPBlock(nn.Module):
    """The transformer's feed-forward part: Linear(dim, hidden)-GELU-Linear(hidden, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A ViT (Dosovitskiy et al. 2021) for images ``(C, H, W)``: a Conv2d patch embedding
    (kernel = stride = ``patch``), a class token and learned position embeddings (plain
    deterministic parameters, truncated normal with std 0.02), ``depth`` pre-norm blocks,
    a final LayerNorm and a linear head on the class token."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        C, H, W = input_shape
        tokens = (H // patch) * (W // patch)
        self.patch_embed = nn.Conv2d(C, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    patch: int = 4,
    dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    mlp_ratio: float = 4,
) -> nn.Module:
    """ViT-Tiny for images ``(C, H, W)`` whose ``H`` and ``W`` are multiples of ``patch``:
    dim 192, depth 12, 3 heads, MLP 768 (``mlp_ratio`` 4), pre-norm, class token, learned
    position embeddings, GELU; patch 4 (64 tokens + the class token at 32x32). 5.36 M
    weights at 10 classes."""
    for arg, v in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelError(f"vit {arg} must be an int >= 1, got {v!r}")
    shape = _image("vit-tiny", input_shape, patch)
    if shape[1] % patch or shape[2] % patch:
        raise ModelError(
            f"model 'vit-tiny' needs H and W divisible by the patch size {patch}, got input "
            f"shape {shape}"
        )
    return VisionTransformer(shape, _classes(num_classes), patch, dim, depth, heads, mlp_ratio)


# --------------------------------------------------------------------------- timm


def _timm(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=C)``."""
    shape, K = _shape(input_shape), _classes(num_classes)
    spec = f"--model {TIMM_PREFIX}{name}"
    if not name:
        raise ModelError(f"{spec}: give a timm model name after 'timm:', e.g. timm:resnet18")
    try:
        import timm
    except ImportError as err:
        if getattr(err, "name", None) == "timm":
            raise ModelError(f"{spec} needs timm: pip install timm") from None
        raise ModelError(f"{spec}: importing timm failed: {_first_line(err)}") from None
    except Exception as err:  # e.g. a torchvision build that does not match torch
        raise ModelError(f"{spec}: importing timm failed: {_first_line(err)}") from None
    if len(shape) != 3:
        raise ModelError(f"{spec} needs image inputs (C, H, W), got input shape {shape}")
    if not timm.is_model(name):
        close = list(timm.list_models(f"*{name}*"))[:5]
        if not close:
            close = difflib.get_close_matches(name, list(timm.list_models()), n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ModelError(f"{spec}: timm has no model {name!r}{hint}; see timm.list_models()")
    kwargs = dict(pretrained=False, num_classes=K, in_chans=shape[0])
    try:
        try:
            # transformers (ViT, DeiT, Swin, ...) fix their token grid from img_size at
            # construction: give them the input's; the other models reject the argument
            net = timm.create_model(name, img_size=shape[1:], **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            net = timm.create_model(name, **kwargs)
    except Exception as err:
        raise ModelError(f"{spec}: timm.create_model failed: {_first_line(err)}") from None
    return net


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- public

_BUILDERS = {"cnn": cnn, "mlp": mlp, "resnet20": resnet20, "vit-tiny": vit_tiny}

_DESCRIPTIONS = {
    "cnn": (
        "the digits CNN of spar train (conv16-conv32-pool-fc64) for any (C, H, W)",
        (1, 8, 8),
        8,
        "8x8 digits, 8 classes",
    ),
    "mlp": ("2 hidden layers of 256, ReLU, for features (D,)", (64,), 10, "D=64, 10 classes"),
    "resnet20": ("ResNet-20 for 32x32 images (He et al. 2016)", (3, 32, 32), 10, "10 classes"),
    "vit-tiny": (
        "ViT-Tiny (dim 192, depth 12, 3 heads, patch 4)",
        (3, 32, 32),
        10,
        "32x32, 10 classes",
    ),
}


def _unknown(name: object) -> ModelError:
    return ModelError(f"unknown model {name!r}: choose one of {', '.join(MODELS)} or timm:NAME")


def describe(name: str) -> str:
    """One line on model ``name`` for ``--help`` and error messages, with the number of
    weights of its deterministic network (a Bayesian one has twice as many parameters:
    a mean and a sigma each), e.g. ``"resnet20: ResNet-20 for 32x32 images (He et al.
    2016), 0.27 M weights (10 classes)"``."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        what = name[len(TIMM_PREFIX) :] or "NAME"
        return f"{TIMM_PREFIX}{what}: the timm model {what} (needs timm: pip install timm)"
    if name not in _BUILDERS:
        raise _unknown(name)
    text, shape, K, where = _DESCRIPTIONS[name]
    with torch.device("meta"):  # counts the weights without memory or the global RNG
        weights = sum(p.numel() for p in _BUILDERS[name](shape, K).parameters())
    return f"{name}: {text}, {weights / 1e6:.2f} M weights ({where})"


def build(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, init_sigma: float = 1e-2
) -> nn.Module:
    """The model ``name`` made Bayesian: its deterministic network (the builder of the same
    name, or timm's for ``"timm:NAME"``) converted by
    ``spar.nn.bayesianize(net, init_sigma=init_sigma, sample_wise=True)``.

    name: one of :data:`MODELS` or ``"timm:NAME"`` (``timm.create_model(NAME,
        pretrained=False, num_classes=num_classes, in_chans=C, img_size=(H, W))``, without
        ``img_size`` for the models that do not take it).
    input_shape: one example's shape, without the batch: ``(C, H, W)`` for images, ``(D,)``
        for features.
    num_classes: outputs of the head.
    init_sigma: the initial posterior standard deviation of every weight.

    Raises :class:`ModelError` for an unknown name, an input shape the model cannot take,
    or a timm model that cannot be made (timm missing, unknown name, create_model failing).
    Subclasses of torch's layers (some of timm's) stay deterministic, as bayesianize
    leaves them.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        net = _timm(name[len(TIMM_PREFIX) :], input_shape, num_classes)
        return spar.nn.bayesianize(net, init_sigma=init_sigma, sample_wise=True)
    if name not in _BUILDERS:
        raise _unknown(name)
    net = _BUILDERS[name](input_shape, num_classes)
    return spar.nn.bayesianize(net, init_sigma=init_sigma, sample_wise=True)
