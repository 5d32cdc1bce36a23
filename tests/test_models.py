"""spar.models: the built-in models of ``spar train`` and the timm glue."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

import spar
from spar import models
from spar.models import ModelError

# (name, input shape, classes, batch): small inputs keep the suite fast
SMALL = [
    ("cnn", (1, 8, 8), 8, 4),
    ("mlp", (20,), 5, 4),
    ("mlp", (1, 8, 8), 3, 4),  # images are flattened
    ("resnet20", (3, 8, 8), 10, 4),
    ("vit-tiny", (3, 8, 8), 10, 2),  # 4 tokens + the class token
]


def _digits_cnn_copy(init_sigma: float) -> nn.Module:
    """The network of spar.train.digits_cnn as it was when spar.models was written."""
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 8),
    )  # fmt: skip
    return spar.nn.bayesianize(net, init_sigma=init_sigma)


def _reference_digits_cnn():
    try:
        from spar.train import digits_cnn
    except ImportError:
        return _digits_cnn_copy
    return digits_cnn


# --------------------------------------------------------------------------- cnn


@pytest.mark.parametrize("reference", [_reference_digits_cnn(), _digits_cnn_copy])
def test_cnn_is_the_digits_cnn(reference):
    torch.manual_seed(0)
    old = reference(0.05)
    torch.manual_seed(0)
    new = models.build("cnn", (1, 8, 8), 8, init_sigma=0.05)
    assert [type(m) for m in new.modules()] == [type(m) for m in old.modules()]
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(new_sd) == list(old_sd)
    for k in old_sd:
        assert torch.equal(new_sd[k], old_sd[k]), k
    new.load_state_dict(old_sd)  # an old checkpoint loads


def test_cnn_any_image_shape():
    net = models.cnn((3, 7, 9), 5)
    assert net[6].in_features == 32 * 3 * 4
    assert net(torch.randn(2, 3, 7, 9)).shape == (2, 5)


# --------------------------------------------------------------------------- all models


@pytest.mark.parametrize(("name", "shape", "K", "B"), SMALL)
def test_montecarlo_shape_and_gradients(name, shape, K, B):
    torch.manual_seed(0)
    model = models.build(name, shape, K)
    assert not any(type(m) in (nn.Linear, nn.Conv2d, nn.BatchNorm2d) for m in model.modules())
    mc = spar.nn.MonteCarlo(model, num_samples=3, seed=0)
    out = mc(torch.randn(B, *shape))
    assert out.shape == (3, B, K)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # the samples differ
    y = torch.arange(B) % K
    loss = spar.losses.elbo(out, y, kl=spar.nn.kl_divergence(model), dataset_size=100)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_init_sigma_reaches_every_layer():
    model = models.build("resnet20", (3, 8, 8), 10, init_sigma=0.03)
    layers = [m for m in model.modules() if isinstance(m, spar.nn.BayesModule)]
    assert len(layers) == 19 + 2 + 1  # convs, shortcut projections, head
    for m in layers:
        torch.testing.assert_close(m.sigma("weight"), torch.full_like(m.weight_mu, 0.03))


# --------------------------------------------------------------------------- resnet20


def test_resnet20_structure():
    with torch.device("meta"):
        net = models.resnet20((3, 32, 32), 10)
    weights = sum(p.numel() for p in net.parameters())
    assert 0.265e6 < weights < 0.28e6, weights
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21  # 1 stem + 18 in blocks + 2 projection shortcuts (option B)
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [32, 64]
    bayes = models.build("resnet20", (3, 8, 8), 10)
    norms = [m for m in bayes.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 21 and all(type(m) is spar.nn.BatchNorm2d for m in norms)
    assert models.build("resnet20", (3, 32, 32), 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_chunked_equals_one_pass():
    torch.manual_seed(0)
    model = models.build("resnet20", (3, 8, 8), 10).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    one = spar.nn.MonteCarlo(model, 4, seed=0, chunk=None)(x)
    chunked = spar.nn.MonteCarlo(twin, 4, seed=0, chunk=2)(x)
    assert one.shape == (4, 4, 10)
    torch.testing.assert_close(chunked, one, atol=1e-5, rtol=0)
    for (n, a), (_, b) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=n)


# --------------------------------------------------------------------------- vit-tiny


def test_vit_tiny_structure():
    with torch.device("meta"):
        net = models.vit_tiny((3, 32, 32), 10)
    assert net.pos_embed.shape == (1, 65, 192) and net.cls_token.shape == (1, 1, 192)
    assert len(net.blocks) == 12
    block = net.blocks[0]
    assert block.attn.heads == 3 and block.attn.qkv.out_features == 3 * 192
    assert block.mlp.fc1.out_features == 768
    assert net.patch_embed.kernel_size == (4, 4) and net.patch_embed.stride == (4, 4)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in net.modules())
    weights = sum(p.numel() for p in net.parameters())
    assert 5.3e6 < weights < 5.45e6, weights


def test_vit_attention_matches_torch():
    torch.manual_seed(0)
    attn = models.Attention(12, 3)
    ref = nn.MultiheadAttention(12, 3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0])


def test_vit_tokens_keep_their_sample():
    """The flattened token rows of sample s go through sample s's weights: a model run on
    samples [0, 3) in one pass equals three runs of one sample each (chunk=1)."""
    torch.manual_seed(0)
    model = models.build("vit-tiny", (3, 8, 8), 4, init_sigma=0.2)
    model.blocks = model.blocks[:2]
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    one = spar.nn.MonteCarlo(model, 3, seed=1)(x)
    each = spar.nn.MonteCarlo(twin, 3, seed=1, chunk=1)(x)
    torch.testing.assert_close(each, one, atol=1e-5, rtol=0)
    assert not torch.allclose(one[0], one[2], atol=1e-3)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "shape", "words"),
    [
        ("cnn", (64,), ["'cnn'", "(64,)"]),
        ("cnn", (1, 1, 8), ["'cnn'", "(1, 1, 8)", "H, W >= 2"]),
        ("resnet20", (3, 2, 32), ["'resnet20'", "(3, 2, 32)", ">= 4"]),
        ("vit-tiny", (3, 30, 32), ["'vit-tiny'", "(3, 30, 32)", "patch size 4"]),
        ("vit-tiny", (784,), ["'vit-tiny'", "(784,)"]),
        ("mlp", (), ["input_shape"]),
        ("mlp", (0, 3), ["input_shape", "(0, 3)"]),
    ],
)
def test_shape_errors(name, shape, words):
    with pytest.raises(ModelError) as info:
        models.build(name, shape, 10)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_name_and_bad_classes():
    with pytest.raises(ModelError, match="unknown model 'resnet18'") as info:
        models.build("resnet18", (3, 32, 32), 10)
    for option in (*models.MODELS, "timm:NAME"):
        assert option in str(info.value)
    with pytest.raises(ModelError, match="num_classes"):
        models.build("cnn", (1, 8, 8), 0)
    with pytest.raises(ValueError):  # ModelError is a ValueError
        models.describe("nope")


def test_describe():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    lines = [models.describe(n) for n in models.MODELS]
    assert torch.equal(torch.rand(3), a)  # counting the weights drew nothing
    for name, line in zip(models.MODELS, lines, strict=True):
        assert line.startswith(f"{name}: ") and "\n" not in line
    assert "0.27 M weights" in models.describe("resnet20")
    assert "5.36 M weights" in models.describe("vit-tiny")
    assert "timm" in models.describe("timm:resnet18")


# --------------------------------------------------------------------------- timm glue


class _Tokens(nn.Module):
    """A tiny token model like timm's transformers: a patch conv, Linear on (N, T, D)."""

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_chans, 6, 2, stride=2)
        self.fc = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, 6)
        t = torch.relu(self.fc(t)).mean(1)
        return self.head(self.norm(t))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    names = ["resnet18", "resnet10t", "resnet50", "vit_tiny", "convnext_atto", "resnet101",
             "resnet152", "resnet26"]  # fmt: skip
    mod = types.ModuleType("timm")

    def create_model(name, pretrained=True, num_classes=1000, in_chans=3, **kw):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes,
                          in_chans=in_chans, **kw))  # fmt: skip
        if name == "broken":
            raise RuntimeError("weights for broken are missing\nsecond line")
        if name == "vit_tiny":
            return _Tokens(in_chans, num_classes)
        if "img_size" in kw:
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'img_size'")
        return nn.Sequential(
            nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
            nn.Linear(4, num_classes),
        )  # fmt: skip

    def list_models(pattern="*"):
        import fnmatch

        return [n for n in names + ["broken"] if fnmatch.fnmatch(n, pattern)]

    mod.create_model = create_model
    mod.list_models = list_models
    mod.is_model = lambda name: name in names + ["broken"]
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


def test_timm_builds_and_is_bayesian(fake_timm):
    torch.manual_seed(0)
    model = models.build("timm:vit_tiny", (3, 8, 8), 7, init_sigma=0.02)
    assert fake_timm == [dict(name="vit_tiny", pretrained=False, num_classes=7, in_chans=3,
                              img_size=(8, 8))]  # fmt: skip
    assert isinstance(model.fc, spar.nn.BayesLinear) and isinstance(model.head, spar.nn.BayesLinear)
    assert type(model.norm) is spar.nn.BatchNorm1d
    assert model.fc.init_sigma == 0.02
    out = spar.nn.MonteCarlo(model, 3, seed=0)(torch.randn(2, 3, 8, 8))  # fc on (3*2, 16, 6)
    assert out.shape == (3, 2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_without_img_size(fake_timm):
    model = models.build("timm:resnet18", (1, 6, 6), 4)
    assert [c["name"] for c in fake_timm] == ["resnet18", "resnet18"]
    assert "img_size" not in fake_timm[1] and fake_timm[1]["in_chans"] == 1
    assert isinstance(model[0], spar.nn.BayesConv2d)


def test_timm_unknown_name_lists_close_ones(fake_timm):
    with pytest.raises(ModelError) as info:
        models.build("timm:resnet", (3, 32, 32), 10)
    msg = str(info.value)
    assert "no model 'resnet'" in msg and "\n" not in msg
    close = msg.split("(close: ")[1].split(")")[0].split(", ")
    assert len(close) == 5 and all("resnet" in n for n in close)
    with pytest.raises(ModelError, match="close: resnet18"):  # difflib when no pattern hit
        models.build("timm:rezznet18", (3, 32, 32), 10)
    assert not fake_timm


def test_timm_create_model_failure(fake_timm):
    with pytest.raises(ModelError) as info:
        models.build("timm:broken", (3, 32, 32), 10)
    assert str(info.value) == (
        "--model timm:broken: timm.create_model failed: weights for broken are missing"
    )
    with pytest.raises(ModelError, match=r"needs image inputs \(C, H, W\)"):
        models.build("timm:resnet18", (64,), 10)


def test_timm_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ModuleNotFoundError
    with pytest.raises(ModelError) as info:
        models.build("timm:resnet18", (3, 32, 32), 10)
    assert str(info.value) == "--model timm:resnet18 needs timm: pip install timm"


def test_real_timm_resnet18():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = models.build("timm:resnet18", (3, 32, 32), 10)
    assert any(isinstance(m, spar.nn.BayesConv2d) for m in model.modules())
    out = spar.nn.MonteCarlo(model, 2, seed=0)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
