"""spar.datasets: digits (bit-equal with the former spar.train code), CIFAR-10 python batches
and .npz files written here in the real formats, held-out classes, OOD paths, augmentation."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spar import datasets
from spar.datasets import Augment, DatasetError, augment, load

# ----------------------------------------------------------------------------- helpers


def _old_digits_splits(seed: int = 0, test_fraction: float = 0.2):
    """The former ``spar.train.digits_splits`` (verbatim logic), for the bit-equality test."""
    try:
        from spar.train import digits_splits

        return digits_splits(seed, test_fraction)
    except ImportError:
        pass
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    ood = y >= 8
    x_in, y_in = x[~ood], y[~ood]
    perm = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x_in) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x_in[train], y_in[train]), (x_in[test], y_in[test]), x[ood]


def _old_augment(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """The former ``spar.train.augment`` (verbatim logic)."""
    try:
        from spar.train import augment as old

        return old(x, gen)
    except ImportError:
        pass
    if gen is None:
        return x
    B, _, H, W = x.shape
    shift = torch.randint(-1, 2, (B, 2), generator=gen)
    scale = 1.0 + 0.2 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(H) + 1 - shift[:, :1]).view(B, 1, H, 1).expand(B, 1, H, W + 2)
    cols = (torch.arange(W) + 1 - shift[:, 1:]).view(B, 1, 1, W).expand(B, 1, H, W)
    shifted = padded.gather(2, rows).gather(3, cols)
    return (shifted * scale).clamp(0, 1)


def _one_line_error(exc_info, *words: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def _check_tensors(s: datasets.Splits) -> None:
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "x_ood"):
        t = getattr(s, key)
        if t is None:
            continue
        assert t.device.type == "cpu" and t.is_contiguous(), key
        assert t.dtype == (torch.int64 if key.startswith("y") else torch.float32), key
    assert s.input_shape == tuple(s.x_train.shape[1:])
    assert len(s.class_names) == s.num_classes
    assert int(s.y_train.max()) < s.num_classes and int(s.y_test.max()) < s.num_classes


# CIFAR-10 python batches: 10 images each, written like the real (Python 2) files


def _cifar_batch(rng: np.random.Generator, n: int = 10, labels=None) -> dict:
    return {
        b"batch_label": b"synthetic batch",
        b"labels": list(labels) if labels is not None else [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar(root: Path, meta: bool = True, seed: int = 0) -> tuple[Path, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = _cifar_batch(rng)
    batches["test_batch"] = _cifar_batch(rng, labels=[i % 10 for i in range(10)])
    for name, b in batches.items():
        _write_pickle(folder / name, b)
    if meta:
        names = [f"class{c}".encode() for c in range(10)]
        _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder, batches


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    folder, batches = _make_cifar(root)
    return root, folder, batches


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _basic_npz(path: Path, n_train=40, n_test=20, shape=(6,), k=4, **extra) -> Path:
    rng = np.random.default_rng(1)
    arrays = dict(
        x_train=rng.random((n_train, *shape)).astype(np.float32),
        y_train=np.arange(n_train) % k,
        x_test=rng.random((n_test, *shape)).astype(np.float32),
        y_test=np.arange(n_test) % k,
    )
    arrays.update(extra)
    return _npz(path, **{k_: v for k_, v in arrays.items() if v is not None})


# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("seed", [0, 5])
def test_digits_bit_equal_with_former_code(seed):
    s = load("digits", seed=seed, val_fraction=0)
    (x_tr, y_tr), (x_te, y_te), x_ood = _old_digits_splits(seed)
    for got, want in [
        (s.x_train, x_tr),
        (s.y_train, y_tr),
        (s.x_test, x_te),
        (s.y_test, y_te),
        (s.x_ood, x_ood),
    ]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert s.x_val is None and s.y_val is None
    assert s.num_classes == 8 and s.class_names == tuple("01234567")
    assert s.ood_name == "held-out classes 8, 9"
    assert s.augment == Augment(pad=1, jitter=0.2)
    assert s.input_shape == (1, 8, 8)
    _check_tensors(s)


def test_digits_val_split_carved_from_train():
    full = load("digits", seed=3, val_fraction=0)
    s = load("digits", seed=3, val_fraction=0.2)
    n = len(full.x_train)
    n_val = int(n * 0.2)
    assert len(s.x_val) == n_val and len(s.x_train) == n - n_val
    # the permutation seeded with seed + 1 picks val; both parts keep the original order
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    assert torch.equal(s.x_val, full.x_train[val_idx]) and torch.equal(
        s.y_val, full.y_train[val_idx]
    )
    assert torch.equal(s.x_train, full.x_train[train_idx])
    assert torch.equal(s.x_test, full.x_test) and torch.equal(s.x_ood, full.x_ood)
    _check_tensors(s)


def test_digits_held_out_classes_and_none():
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    s = load("digits", ood_classes=(5, 0), val_fraction=0)
    assert s.num_classes == 8 and s.class_names == ("1", "2", "3", "4", "6", "7", "8", "9")
    assert s.ood_name == "held-out classes 0, 5"
    held = (target == 0) | (target == 5)
    assert len(s.x_ood) == int(held.sum())
    assert len(s.x_train) + len(s.x_test) == int((~held).sum())
    # labels are renumbered in increasing order of the original digit: 1 -> 0, ..., 9 -> 7
    assert sorted(set(s.y_train.tolist())) == list(range(8))

    none = load("digits", ood_classes=(), val_fraction=0)
    assert none.num_classes == 10 and none.x_ood is None and none.ood_name is None
    assert len(none.x_train) + len(none.x_test) == len(target)


def test_digits_argument_errors():
    with pytest.raises(ValueError, match="data_dir"):
        load("digits", "/some/where")
    with pytest.raises(ValueError, match="unknown dataset"):
        load("mnist")
    for bad in (-0.1, 0.6, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            load("digits", val_fraction=bad)
    with pytest.raises(DatasetError) as e:
        load("digits", ood_classes=(3, 12, -1))
    _one_line_error(e, "unknown class ids", "[-1, 12]", "0..9")
    with pytest.raises(DatasetError) as e:
        load("digits", ood_classes=range(9))
    _one_line_error(e, "holds out 9 of the 10", "at least 2")
    with pytest.raises(ValueError, match="ood_classes"):
        load("digits", ood_classes=[1.5])


# ----------------------------------------------------------------------------- val split


def test_val_split_disjoint_deterministic(tmp_path):
    n = 50
    x = np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)  # row i holds i: identifiable
    path = _npz(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.arange(n) % 3,
        x_test=x[:9],
        y_test=np.arange(9) % 3,
    )
    a = load("npz", path, seed=7, val_fraction=0.3)
    b = load("npz", path, seed=7, val_fraction=0.3)
    c = load("npz", path, seed=8, val_fraction=0.3)
    assert len(a.x_val) == int(n * 0.3) == 15 and len(a.x_train) == 35
    ids_val, ids_train = a.x_val[:, 0].long(), a.x_train[:, 0].long()
    assert set(ids_val.tolist()).isdisjoint(ids_train.tolist())
    assert sorted(ids_val.tolist() + ids_train.tolist()) == list(range(n))
    assert torch.equal(ids_val, ids_val.sort().values)  # original order kept
    assert torch.equal(ids_train, ids_train.sort().values)
    assert torch.equal(a.y_val, ids_val % 3) and torch.equal(a.y_train, ids_train % 3)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_val, c.x_val)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.x_val[:, 0].long(), perm[:15].sort().values)
    zero = load("npz", path, seed=7, val_fraction=0)
    assert zero.x_val is None and torch.equal(zero.x_train[:, 0].long(), torch.arange(n))
    tiny = load("npz", path, val_fraction=0.01)  # int(50 * 0.01) == 0
    assert tiny.x_val is None and len(tiny.x_train) == n


# ----------------------------------------------------------------------------- cifar10


def test_cifar10_layout_labels_names(cifar):
    root, folder, batches = cifar
    for where in (root, folder, str(folder)):
        s = load("cifar10", where, val_fraction=0)
        assert s.x_train.shape == (50, 3, 32, 32) and s.x_test.shape == (10, 3, 32, 32)
        train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert s.y_train.tolist() == train_labels
        assert s.y_test.tolist() == batches["test_batch"][b"labels"]
        assert s.class_names == tuple(f"class{c}" for c in range(10)) and s.num_classes == 10
        assert s.x_ood is None and s.ood_name is None
        assert s.augment == Augment(pad=4, flip=True)
        _check_tensors(s)
    # a pixel round-trips through the CHW row layout and the normalisation
    mean, std = datasets.CIFAR10_MEAN, datasets.CIFAR10_STD
    for img, c, i, j in [(0, 0, 0, 0), (13, 1, 5, 31), (49, 2, 31, 7)]:
        batch = batches[f"data_batch_{img // 10 + 1}"]
        v = int(batch[b"data"][img % 10, c * 1024 + i * 32 + j])
        want = (v / 255.0 - mean[c]) / std[c]
        assert abs(float(s.x_train[img, c, i, j]) - want) < 1e-5
    v = int(batches["test_batch"][b"data"][3, 2 * 1024 + 31 * 32 + 31])
    assert abs(float(s.x_test[3, 2, 31, 31]) - (v / 255.0 - mean[2]) / std[2]) < 1e-5
    # channel statistics: the data is uniform in 0..255, so normalised values are ordered
    assert float(s.x_train[:, 0].min()) == pytest.approx((0 - mean[0]) / std[0], abs=1e-5)


def test_cifar10_default_names_held_out_and_val(tmp_path):
    folder, batches = _make_cifar(tmp_path, meta=False)
    s = load("cifar10", folder, ood_classes=[3], val_fraction=0.2)
    assert s.class_names == tuple(n for n in datasets.CIFAR10_CLASSES if n != "cat")
    assert s.num_classes == 9 and s.ood_name == "held-out classes 3 (cat)"
    # OOD = the test examples of class 3 (test labels are 0..9, one each: index 3)
    data = batches["test_batch"][b"data"]
    assert s.x_ood.shape == (1, 3, 32, 32)
    assert torch.equal(s.x_ood, datasets._cifar_images(data[3:4]))
    assert s.y_test.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # 4..9 renumbered to 3..8
    n_train = sum(sum(1 for v in b[b"labels"] if v != 3) for k, b in batches.items() if k[0] == "d")
    assert len(s.x_train) + len(s.x_val) == n_train and len(s.x_val) == int(n_train * 0.2)
    _check_tensors(s)


def _break(folder: Path, name: str, obj) -> None:
    if isinstance(obj, bytes):
        (folder / name).write_bytes(obj)
    else:
        _write_pickle(folder / name, obj)


@pytest.mark.parametrize(
    "name, obj, words",
    [
        ("data_batch_3", None, ["data_batch_3", "missing"]),
        ("data_batch_1", b"this is not a pickle", ["data_batch_1", "not a valid CIFAR-10 pickle"]),
        ("test_batch", [1, 2, 3], ["test_batch", "not a dict"]),
        ("data_batch_2", {b"data": np.zeros((10, 3072), np.uint8)}, ["lacks", "labels"]),
        (
            "data_batch_4",
            {b"data": np.zeros((10, 3000), np.uint8), b"labels": [0] * 10},
            ["data_batch_4", "(10, 3000)", "(n, 3072)"],
        ),
        (
            "data_batch_5",
            {b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10},
            ["data_batch_5", "float32", "uint8"],
        ),
        (
            "data_batch_1",
            {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9 + [10]},
            ["data_batch_1", "0..10", "expected 0..9"],
        ),
        (
            "data_batch_1",
            {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9},
            ["9 labels for 10 images"],
        ),
        (
            "test_batch",
            OrderedDict(data=np.zeros((2, 3072), np.uint8), labels=[0, 1]),
            ["test_batch", "not allowed"],
        ),
        ("batches.meta", {b"label_names": [b"a", b"b"]}, ["batches.meta", "label_names"]),
    ],
)
def test_cifar10_errors(tmp_path, name, obj, words):
    folder, _ = _make_cifar(tmp_path)
    if obj is None:
        (folder / name).unlink()
    else:
        _break(folder, name, obj)
    with pytest.raises(DatasetError) as e:
        load("cifar10", tmp_path)
    _one_line_error(
        e,
        *words,
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        "data_batch_1 ... data_batch_5 and test_batch",
    )


def test_cifar10_folder_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load("cifar10")
    _one_line_error(e, "data_dir", "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError) as e:
        load("cifar10", tmp_path / "nowhere")
    _one_line_error(e, "nowhere", "no such folder", "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError) as e:
        load("cifar10", tmp_path)  # empty folder
    _one_line_error(e, "data_batch_1", "missing", "cifar-10-python.tar.gz")


# ----------------------------------------------------------------------------- npz


def test_npz_features(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.normal(size=(30, 5))  # float64: converted to float32, values as given
    path = _npz(
        tmp_path / "feat.npz",
        x_train=x_tr,
        y_train=np.arange(30) % 3,
        x_test=x_tr[:6] * 2,
        y_test=np.array([0, 1, 2, 2, 1, 0], np.uint8),
        class_names=np.array(["a", "b", "c"]),
    )
    s = load("npz", path, val_fraction=0)
    assert s.name == "npz" and s.input_shape == (5,) and s.augment is None
    assert torch.equal(s.x_train, torch.from_numpy(x_tr.astype(np.float32)))
    assert s.y_test.tolist() == [0, 1, 2, 2, 1, 0]
    assert s.num_classes == 3 and s.class_names == ("a", "b", "c")
    assert s.x_ood is None and s.ood_name is None
    _check_tensors(s)
    # a folder holding exactly one .npz
    assert torch.equal(load("npz", tmp_path, val_fraction=0).x_test, s.x_test)


@pytest.mark.parametrize(
    "shape, to_nchw",
    [
        ((12, 10), lambda a: a[:, None]),  # (N, H, W): channel axis added
        ((1, 12, 10), lambda a: a),  # (N, 1, H, W)
        ((3, 12, 10), lambda a: a),  # (N, 3, H, W)
        ((2, 12, 10), lambda a: a),  # (N, C, H, W) with C = 2
        ((12, 10, 3), lambda a: a.transpose(0, 3, 1, 2)),  # (N, H, W, 3): channels-last
        ((12, 10, 1), lambda a: a.transpose(0, 3, 1, 2)),  # (N, H, W, 1)
        ((3, 10, 3), lambda a: a),  # axis 1 is 3: taken as (N, C, H, W)
    ],
)
def test_npz_image_layouts_uint8(tmp_path, shape, to_nchw):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (16, *shape), dtype=np.uint8)
    path = _npz(
        tmp_path / "img.npz",
        x_train=x,
        y_train=np.arange(16) % 2,
        x_test=x[:4],
        y_test=np.array([1, 0, 1, 1]),
    )
    s = load("npz", path, val_fraction=0)
    want = torch.from_numpy(to_nchw(x).astype(np.float32) / 255.0)
    assert s.x_train.shape == want.shape and torch.allclose(s.x_train, want, atol=1e-7, rtol=0)
    assert float(s.x_train.max()) <= 1.0
    assert s.augment == Augment(pad=max(1, s.input_shape[1] // 8))
    assert s.class_names == ("0", "1")
    _check_tensors(s)


def test_npz_x_ood_and_held_out(tmp_path):
    rng = np.random.default_rng(3)
    x_ood = rng.random((7, 1, 16, 16)).astype(np.float32)
    path = _basic_npz(tmp_path / "data.npz", shape=(1, 16, 16), k=4, x_ood=x_ood)
    s = load("npz", path)
    assert torch.equal(s.x_ood, torch.from_numpy(x_ood)) and s.ood_name == "data.npz"
    assert s.augment == Augment(pad=2)
    # held-out classes replace the file's x_ood: OOD = the test examples of class 1 and 2
    h = load("npz", path, ood_classes=(1, 2), val_fraction=0)
    with np.load(path) as f:
        x_te, y_te = torch.from_numpy(f["x_test"]), torch.from_numpy(f["y_test"])
        y_tr = torch.from_numpy(f["y_train"])
    mask = (y_te == 1) | (y_te == 2)
    assert torch.equal(h.x_ood, x_te[mask]) and h.ood_name == "held-out classes 1, 2"
    assert torch.equal(h.x_test, x_te[~mask])
    assert torch.equal(h.y_test, torch.where(y_te[~mask] == 3, 1, 0))
    assert torch.equal(h.y_train, torch.where(y_tr[(y_tr == 0) | (y_tr == 3)] == 3, 1, 0))
    assert h.num_classes == 2 and h.class_names == ("0", "3")
    with pytest.raises(DatasetError) as e:
        load("npz", path, ood_classes=(4,))
    _one_line_error(e, "unknown class ids [4]", "0..3")


def _npz_error_cases(tmp_path: Path):
    f32 = np.float32
    rng = np.random.default_rng(4)
    x = rng.random((8, 4)).astype(f32)
    y = np.arange(8) % 2
    ok = dict(x_train=x, y_train=y, x_test=x, y_test=y)

    def case(name, words, **changes):
        arrays = {**ok, **changes}
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        return path, words

    bad_x = x.copy()
    bad_x[2, 1] = np.nan
    inf_x = x.copy()
    inf_x[0, 0] = np.inf
    obj = np.empty(8, dtype=object)
    obj[:] = [{"a": i} for i in range(8)]
    cases = [
        case("missing", ["array y_test is missing", "required"], y_test=None),
        case("nan", ["array x_train", "non-finite"], x_train=bad_x),
        case("inf", ["array x_test", "non-finite"], x_test=inf_x),
        case("shape", ["x_test", "(5,)", "(4,)"], x_test=rng.random((8, 5)).astype(f32)),
        case("objx", ["array x_train", "object"], x_train=obj),
        case("objy", ["array y_train", "object"], y_train=obj),
        case("intx", ["array x_train", "int64", "float or uint8"], x_train=np.ones((8, 4), int)),
        case("floaty", ["array y_train", "float", "integer"], y_train=y.astype(f32)),
        case("y2d", ["array y_test", "1-D"], y_test=y[:, None]),
        case("ylen", ["array y_train", "7 labels for 8", "x_train"], y_train=y[:7]),
        case("yneg", ["array y_train", "negative"], y_train=y - 1),
        case("ytest", ["y_test has label 5", "0..1"], y_test=np.array([5, 0, 1, 0, 1, 0, 1, 0])),
        case("single", ["single class"], y_train=np.zeros(8, int)),
        case("dim5", ["array x_train", "(8, 1, 1, 2, 2)"], x_train=x.reshape(8, 1, 1, 2, 2)),
        case("empty", ["array x_test", "empty"], x_test=x[:0], y_test=y[:0]),
        case("names", ["class_names", "3 names for 2 classes"], class_names=np.array(list("abc"))),
        case("namesnum", ["class_names", "strings"], class_names=np.array([1, 2])),
        case("oodshape", ["x_ood", "(3,)", "(4,)"], x_ood=x[:, :3]),
        case("oodnan", ["array x_ood", "non-finite"], x_ood=bad_x),
    ]
    return cases


def test_npz_errors(tmp_path):
    for path, words in _npz_error_cases(tmp_path):
        with pytest.raises(DatasetError) as e:
            load("npz", path)
        _one_line_error(e, path.name, *words)


def test_npz_file_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load("npz")
    _one_line_error(e, "data_dir", ".npz")
    text = tmp_path / "notzip.npz"
    text.write_text("hello")
    with pytest.raises(DatasetError) as e:
        load("npz", text)
    _one_line_error(e, "notzip.npz", "not a .npz (zip) file")
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DatasetError) as e:
        load("npz", npy)
    _one_line_error(e, "arr.npy", "not a .npz (zip) file")
    with pytest.raises(DatasetError) as e:
        load("npz", tmp_path / "absent.npz")
    _one_line_error(e, "absent.npz", "no such file")
    folder = tmp_path / "two"
    folder.mkdir()
    _basic_npz(folder / "a.npz")
    _basic_npz(folder / "b.npz")
    with pytest.raises(DatasetError) as e:
        load("npz", folder)
    _one_line_error(e, "2 .npz files", "a.npz, b.npz", "exactly one")
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DatasetError) as e:
        load("npz", empty)
    _one_line_error(e, "0 .npz files")


# ----------------------------------------------------------------------------- ood paths


def test_ood_npz_for_digits(tmp_path):
    rng = np.random.default_rng(5)
    x_ood = rng.random((9, 8, 8)).astype(np.float32)  # (N, H, W): a channel axis is added
    path = _npz(tmp_path / "noise.npz", x_ood=x_ood)
    s = load("digits", ood=path, ood_classes=(), val_fraction=0)
    assert s.num_classes == 10 and s.ood_name == "noise.npz"
    assert torch.equal(s.x_ood, torch.from_numpy(x_ood)[:, None])
    _check_tensors(s)
    # no x_ood in the file: its x_test is used
    path2 = _npz(tmp_path / "other.npz", x_test=x_ood[:4], y_test=np.zeros(4, int))
    assert torch.equal(load("digits", ood=path2).x_ood, torch.from_numpy(x_ood[:4])[:, None])
    # the default held-out classes still leave train and test: the file replaces their OOD set
    held = load("digits", ood=path, val_fraction=0)
    assert held.num_classes == 8 and held.ood_name == "noise.npz"
    assert torch.equal(held.x_test, load("digits", val_fraction=0).x_test)


def test_ood_errors(tmp_path):
    wrong = _npz(tmp_path / "wrong.npz", x_ood=np.zeros((3, 1, 9, 9), np.float32))
    with pytest.raises(DatasetError) as e:
        load("digits", ood=wrong)
    _one_line_error(e, "wrong.npz", "(1, 9, 9)", "(1, 8, 8)")
    neither = _npz(tmp_path / "neither.npz", x_train=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(DatasetError) as e:
        load("digits", ood=neither)
    _one_line_error(e, "neither.npz", "neither x_ood nor x_test")
    with pytest.raises(DatasetError) as e:
        load("digits", ood=tmp_path / "absent.npz")
    _one_line_error(e, "absent.npz", "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as e:
        load("digits", ood=empty)  # a folder without .npz files nor test_batch
    _one_line_error(e, "test_batch", "missing", "cifar-10-python.tar.gz")


def test_ood_cifar_folder_for_npz(cifar, tmp_path):
    root, folder, batches = cifar
    rng = np.random.default_rng(6)
    own_ood = rng.random((5, 32, 32, 3)).astype(np.float32)
    path = _basic_npz(tmp_path / "imgs.npz", shape=(3, 32, 32), x_ood=own_ood)
    assert load("npz", path).x_ood.shape == (5, 3, 32, 32)  # the file's own, channels-last
    s = load("npz", path, ood=root)  # the ood argument replaces the file's x_ood
    assert torch.equal(s.x_ood, datasets._cifar_images(batches["test_batch"][b"data"]))
    assert s.ood_name.startswith("CIFAR-10 test set") and s.augment == Augment(pad=4)
    with pytest.raises(DatasetError) as e:
        load("digits", ood=folder)
    _one_line_error(e, "(3, 32, 32)", "(1, 8, 8)")


# ----------------------------------------------------------------------------- augment


def test_augment_bit_equal_with_former_digits_augment():
    x = load("digits", val_fraction=0).x_train[:64]
    for seed in (0, 11):
        g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):  # successive batches: the generators must stay in step
            want = _old_augment(x, g_old)
            got = augment(x, g_new, Augment(pad=1, jitter=0.2))
            assert torch.equal(got, want)
        assert torch.equal(g_old.get_state(), g_new.get_state())


def test_augment_no_op_cases():
    x = torch.rand(4, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert augment(x, None, Augment(pad=1)) is x
    assert augment(x, g, None) is x
    feats = torch.rand(4, 6)
    assert augment(feats, g, Augment(pad=1, flip=True)) is feats
    assert torch.equal(augment(x, g, Augment()), x)
    assert torch.equal(g.get_state(), state)  # nothing drawn


def _expected(x, shifts, flips, pad):
    B, C, H, W = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        dr, dc = (int(v) for v in shifts[b]) if shifts is not None else (0, 0)
        for i in range(H):
            for j in range(W):
                si, sj = i - dr, j - dc
                if 0 <= si < H and 0 <= sj < W:
                    out[b, :, i, j] = x[b, :, si, sj]
        if flips is not None and flips[b]:
            out[b] = out[b].flip(-1)
    return out


@pytest.mark.parametrize("spec", [Augment(pad=1, flip=True), Augment(pad=2), Augment(flip=True)])
def test_augment_shift_flip_semantics(spec):
    B = 12
    x = torch.arange(B * 2 * 4 * 5, dtype=torch.float32).view(B, 2, 4, 5) + 1
    g = torch.Generator().manual_seed(3)
    probe = torch.Generator().manual_seed(3)  # the same draws, made first, in the same order
    shifts = torch.randint(-spec.pad, spec.pad + 1, (B, 2), generator=probe) if spec.pad else None
    flips = torch.rand(B, generator=probe) < 0.5 if spec.flip else None
    got = augment(x, g, spec)
    assert torch.equal(got, _expected(x, shifts, flips, spec.pad))
    if flips is not None:
        assert 0 < int(flips.sum()) < B  # both branches exercised
    if shifts is not None:
        assert (shifts != 0).any() and (shifts == spec.pad).any() and (shifts == -spec.pad).any()


def _seed_with(shift: list[int], flip: bool) -> int:
    """A seed whose first draws for one 3x3 image are ``shift`` and ``flip``."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        s = torch.randint(-1, 2, (1, 2), generator=g)[0].tolist()
        f = bool(torch.rand(1, generator=g)[0] < 0.5)
        if s == shift and f == flip:
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize(
    "shift, flip, want",
    [
        # out[i, j] = x[i - dr, j - dc]: (+1, -1) moves the content down and left
        ([1, -1], False, [[0, 0, 0], [2, 3, 0], [5, 6, 0]]),
        ([1, -1], True, [[0, 0, 0], [0, 3, 2], [0, 6, 5]]),  # then mirrored left-right
        ([0, 1], False, [[0, 1, 2], [0, 4, 5], [0, 7, 8]]),
        ([-1, 0], True, [[6, 5, 4], [9, 8, 7], [0, 0, 0]]),
    ],
)
def test_augment_hand_made_image(shift, flip, want):
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    g = torch.Generator().manual_seed(_seed_with(shift, flip))
    got = augment(x, g, Augment(pad=1, flip=True))
    assert got.tolist() == [[want]]


def test_augment_jitter_clamps_and_matches_draws():
    x = torch.rand(6, 3, 4, 4)
    spec = Augment(pad=1, flip=True, jitter=0.8)
    probe = torch.Generator().manual_seed(9)
    shifts = torch.randint(-1, 2, (6, 2), generator=probe)
    scale = 1.0 + 0.8 * (torch.rand(6, 1, 1, 1, generator=probe) - 0.5)
    flips = torch.rand(6, generator=probe) < 0.5
    got = augment(x, torch.Generator().manual_seed(9), spec)
    want = (_expected(x, shifts, flips, 1) * scale).clamp(0, 1)
    assert torch.equal(got, want)


def test_augment_spec_validation():
    with pytest.raises(ValueError, match="pad"):
        Augment(pad=-1)
    with pytest.raises(ValueError, match="jitter"):
        Augment(jitter=-0.1)


def test_no_example_left_after_holding_out_classes(tmp_path):
    y = np.arange(60) % 3
    path = _npz(tmp_path / "t.npz", x_train=np.zeros((60, 4), np.float32), y_train=y,
                x_test=np.zeros((5, 4), np.float32), y_test=np.zeros(5, int))  # fmt: skip
    with pytest.raises(DatasetError) as e:
        load("npz", path, ood_classes=(0,))
    _one_line_error(e, "t.npz", "no test examples")
    with pytest.raises(DatasetError) as e:
        load("npz", _basic_npz(tmp_path / "s.npz", x_train=np.float32(1.0)))
    _one_line_error(e, "s.npz", "scalar")
