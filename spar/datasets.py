"""Datasets for ``spar train`` / ``spar eval``: train, validation, test and OOD splits.

:func:`load` returns a :class:`Splits`: CPU tensors (float32 inputs, int64 labels), the
class names, an out-of-distribution (OOD) set for the uncertainty report and the image
augmentation that suits the data (:class:`Augment`, applied by :func:`augment`). Three
sources, none of them downloaded:

- ``"digits"`` (default): scikit-learn's 8x8 digits, shipped with scikit-learn. By default
  the digits 8 and 9 are held out as OOD inputs and the model learns 0-7.
- ``"cifar10"``: the CIFAR-10 *python* batches in a local folder (what
  ``cifar-10-python.tar.gz`` unpacks into ``cifar-10-batches-py/``).
- ``"npz"``: the user's own arrays in a NumPy ``.npz`` file.

Every split is a pure function of the arguments (``seed`` included), so every rank of a
job loads the same data. Unusable files raise :class:`DatasetError` with a one-line
message that names the file or array and what is wrong.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["DATASETS", "Augment", "DatasetError", "Splits", "augment", "load"]

DATASETS = ("digits", "cifar10", "npz")

#: default held-out classes of each dataset (``ood_classes=None``)
_DEFAULT_OOD_CLASSES = {"digits": (8, 9), "cifar10": (), "npz": ()}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"
_CIFAR_HINT = (
    "expected data_batch_1 ... data_batch_5 and test_batch (optionally batches.meta); "
    "unpack cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) there"
)


class DatasetError(ValueError):
    """A dataset folder/file/array that cannot be used; the message is one line naming the
    file or array and what is wrong/missing."""


@dataclass(frozen=True)
class Augment:
    """A random image augmentation, drawn per example by :func:`augment`.

    Args:
        pad: random crop with zero padding of ``pad`` pixels, i.e. a shift of the image by
            ``-pad..pad`` pixels in each axis with zeros shifted in (0: no shift).
        flip: random horizontal flip (the width axis reversed) with probability 1/2.
        jitter: multiply each image by ``1 + jitter * (u - 0.5)``, ``u ~ U(0, 1)``, then clamp
            to ``[0, 1]`` (0: no jitter and no clamp; meant for inputs in ``[0, 1]``).
    """

    pad: int = 0
    flip: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"Augment.pad must be an int >= 0, got {self.pad!r}")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter <= 2.0):
            raise ValueError(f"Augment.jitter must be a number in [0, 2], got {self.jitter!r}")


@dataclass(frozen=True, eq=False, repr=False)
class Splits:
    """The splits of one dataset, all CPU, contiguous, float32 inputs and int64 labels.

    Attributes:
        name: ``"digits"``, ``"cifar10"`` or ``"npz"``.
        x_train, y_train: training inputs ``(N, C, H, W)`` images or ``(N, D)`` features,
            and labels ``0..num_classes-1``.
        x_val, y_val: validation split carved from the training data (``val_fraction``);
            ``None`` when it would be empty (``val_fraction == 0``).
        x_test, y_test: test split.
        x_ood: out-of-distribution inputs (held-out classes or an ``ood`` file), or None.
        num_classes: number of in-distribution classes.
        class_names: names of the in-distribution classes, index = label.
        ood_name: words for plots/legends, e.g. ``"held-out classes 8, 9"`` or ``"ood.npz"``.
        augment: the image augmentation that suits this data; None for features.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor | None
    num_classes: int
    class_names: tuple[str, ...]
    ood_name: str | None
    augment: Augment | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        def n(t: torch.Tensor | None) -> int:
            return 0 if t is None else len(t)

        return (
            f"Splits({self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={n(self.x_train)}, val={n(self.x_val)}, "
            f"test={n(self.x_test)}, ood={n(self.x_ood)} ({self.ood_name}), "
            f"augment={self.augment})"
        )


# ----------------------------------------------------------------------------- augment


def augment(x: torch.Tensor, gen: torch.Generator | None, spec: Augment | None) -> torch.Tensor:
    """Apply the random augmentation ``spec`` to a batch of images ``x`` ``(B, C, H, W)``.

    Returns ``x`` itself when ``gen`` or ``spec`` is None or ``x`` is not 4-D (features).
    All random numbers come from ``gen`` (so each rank can own its stream), drawn in this
    order, each only when the option is on: the shifts ``randint(-pad, pad + 1, (B, 2))``
    (row, column), the jitter ``rand(B, 1, 1, 1)``, the flips ``rand(B) < 0.5``. They are
    drawn on ``gen``'s device and moved to ``x``'s.

    Then, per example ``b`` with shift ``(dr, dc)``: ``out[b, :, i, j] = x[b, :, i - dr,
    j - dc]`` (zero where that falls outside the image: positive ``dr`` moves the content
    down, positive ``dc`` right); then the width axis is reversed where the flip is drawn;
    then the jitter scales the image and clamps it to ``[0, 1]``.
    """
    if gen is None or spec is None or x.dim() != 4:
        return x
    B, C, H, W = x.shape
    p = spec.pad
    draw = {"generator": gen, "device": gen.device}
    shift = torch.randint(-p, p + 1, (B, 2), **draw).to(x.device) if p > 0 else None
    scale = None
    if spec.jitter > 0:
        scale = 1.0 + spec.jitter * (torch.rand(B, 1, 1, 1, **draw).to(x.device) - 0.5)
    flip = (torch.rand(B, **draw) < 0.5).to(x.device) if spec.flip else None

    out = x
    if shift is not None:
        padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        # out[b, :, i, j] = padded[b, :, i + p - dr_b, j + p - dc_b]
        ar_h = torch.arange(H, device=x.device)
        ar_w = torch.arange(W, device=x.device)
        rows = (ar_h + p - shift[:, :1]).view(B, 1, H, 1).expand(B, C, H, W + 2 * p)
        cols = (ar_w + p - shift[:, 1:]).view(B, 1, 1, W).expand(B, C, H, W)
        out = padded.gather(2, rows).gather(3, cols)
    if flip is not None:
        out = torch.where(flip.view(B, 1, 1, 1), out.flip(3), out)
    if scale is not None:
        out = (out * scale).clamp(0, 1)
    return out


# ----------------------------------------------------------------------------- load


def load(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    ood_classes: Sequence[int] | None = None,
    ood: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
) -> Splits:
    """Load dataset ``name`` and split it into train / validation / test / OOD.

    Args:
        name: one of :data:`DATASETS`.

            - ``"digits"``: scikit-learn's ``load_digits``, images ``(N, 1, 8, 8)`` scaled by
              1/16 into [0, 1]. It has no fixed test split: after removing the held-out
              classes, ``torch.randperm`` (generator seeded with ``seed``) puts the first 20 %
              in test, the rest in train; the OOD set is every example of the held-out
              classes. ``data_dir`` must be None (a path raises ValueError: it would be
              ignored). Augmentation ``Augment(pad=1, jitter=0.2)``.
            - ``"cifar10"``: ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent,
              holding the python batches ``data_batch_1`` ... ``data_batch_5`` and
              ``test_batch`` (class names from ``batches.meta`` when present). Images
              ``(N, 3, 32, 32)`` in [0, 1], then normalised per channel with the usual
              CIFAR-10 mean and std. Augmentation ``Augment(pad=4, flip=True)``. The batches
              are unpickled with a restricted unpickler that only builds numpy arrays,
              lists, dicts, strings and numbers (a pickle could otherwise run any code).
            - ``"npz"``: ``data_dir`` is a ``.npz`` file, or a folder holding exactly one
              ``.npz``. Arrays ``x_train, y_train, x_test, y_test`` (required), ``x_ood`` and
              ``class_names`` (optional). ``x`` arrays are float (used as given) or uint8
              (divided by 255), shaped ``(N, D)`` features, ``(N, H, W)`` (a channel axis is
              added), ``(N, C, H, W)``, or ``(N, H, W, C)`` -- taken as channels-last only
              when the last axis is 1 or 3 and axis 1 is not. ``y`` arrays are 1-D integers
              ``0..K-1`` with ``K`` = the largest training label + 1. Images get
              ``Augment(pad=max(1, H // 8))`` -- no flip, since the user's images need not be
              mirror-symmetric (text, digits) -- and features no augmentation.
        data_dir: where the data is (see ``name``).
        seed: fixes the digits train/test split and (as ``seed + 1``) the validation split.
        ood_classes: class ids (original labels) held out of train and test: their test
            examples become the OOD set (digits: all their examples), the remaining labels
            are renumbered ``0..K-1`` in increasing order of the original label, and
            ``class_names`` keeps the original names. None: the dataset's default
            (:func:`default_ood_classes`: digits ``(8, 9)``, others none); ``()``: none held
            out. For npz, held-out classes replace the file's ``x_ood``.
        ood: a second source of OOD inputs, a ``.npz`` file (its ``x_ood``, else its
            ``x_test``) or a CIFAR-10 folder (its ``test_batch``, normalised as cifar10).
            Its examples must have the shape of the dataset's. It replaces the OOD set of
            the held-out classes, and the file's ``x_ood`` for npz (the held-out classes
            still leave train and test).
        val_fraction: fraction in [0, 0.5] of the training part moved to validation:
            ``n_val = int(len(train) * val_fraction)``; the first ``n_val`` indices of a
            ``torch.randperm`` seeded with ``seed + 1`` go to validation. Both parts keep the
            original order, so ``val_fraction=0`` leaves the training part unchanged.

    Raises:
        ValueError: an unknown ``name``, a bad ``val_fraction``, ``data_dir`` given for digits.
        DatasetError: files or arrays that cannot be used, unknown held-out class ids,
            fewer than two classes left, or no train or test example left.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(val_fraction, bool) or not (
        isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction <= 0.5
    ):
        raise ValueError(f"val_fraction must be a number in [0, 0.5], got {val_fraction!r}")
    if ood_classes is not None:
        try:
            held = tuple(sorted({_as_int(c) for c in ood_classes}))
        except (TypeError, ValueError):
            raise ValueError(
                f"ood_classes must be a sequence of integer class ids, got {ood_classes!r}"
            ) from None
    else:
        held = default_ood_classes(name)

    if name == "digits":
        if data_dir is not None:
            raise ValueError(
                f"data_dir is not used by the digits dataset (it ships with scikit-learn), "
                f"got {str(data_dir)!r}"
            )
        splits = _load_digits(seed, held)
    elif name == "cifar10":
        splits = _load_cifar10(data_dir, held)
    else:
        splits = _load_npz(data_dir, held, replace_ood=ood is not None)

    if ood is not None:
        x_ood, ood_name = _load_ood(ood)
        if tuple(x_ood.shape[1:]) != splits["x_train"].shape[1:]:
            raise DatasetError(
                f"ood {str(ood)!r}: its examples have shape {tuple(x_ood.shape[1:])}, but "
                f"the {name} inputs have shape {tuple(splits['x_train'].shape[1:])}"
            )
        splits["x_ood"], splits["ood_name"] = x_ood, ood_name

    for split in ("train", "test"):
        if len(splits[f"x_{split}"]) == 0:
            raise DatasetError(
                f"{name}{'' if data_dir is None else f' {str(data_dir)!r}'}: no {split} "
                f"examples are left after holding out classes {list(held)} (ood_classes)"
            )
    x_tr, y_tr, x_val, y_val = _val_split(splits["x_train"], splits["y_train"], seed, val_fraction)
    splits.update(x_train=x_tr, y_train=y_tr, x_val=x_val, y_val=y_val)
    for key, value in splits.items():
        if isinstance(value, torch.Tensor):
            splits[key] = value.contiguous()
    return Splits(name=name, **splits)


def default_ood_classes(name: str) -> tuple[int, ...]:
    """The classes :func:`load` holds out of dataset ``name`` when ``ood_classes`` is None:
    ``(8, 9)`` for digits, none for the others."""
    return _DEFAULT_OOD_CLASSES[name]


def _as_int(c: object) -> int:
    if isinstance(c, bool) or int(c) != c:  # type: ignore[call-overload]
        raise ValueError(c)
    return int(c)  # type: ignore[call-overload]


def _val_split(
    x: torch.Tensor, y: torch.Tensor, seed: int, val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Move ``int(len(x) * val_fraction)`` examples, chosen by a permutation seeded with
    ``seed + 1``, into validation; both parts keep their original order."""
    n_val = int(len(x) * val_fraction)
    if n_val == 0:
        return x, y, None, None
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    val = perm[:n_val].sort().values
    train = perm[n_val:].sort().values
    return x[train], y[train], x[val], y[val]


def _check_held(held: tuple[int, ...], num_classes: int, what: str) -> None:
    unknown = [c for c in held if not 0 <= c < num_classes]
    if unknown:
        raise DatasetError(
            f"ood_classes: unknown class ids {unknown} for {what}; "
            f"valid ids are 0..{num_classes - 1}"
        )
    if num_classes - len(held) < 2:
        raise DatasetError(
            f"ood_classes holds out {len(held)} of the {num_classes} classes of {what}; "
            f"at least 2 classes must remain"
        )


def _remap(held: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """Lookup table original label -> new label (-1 for held-out classes)."""
    kept = [c for c in range(num_classes) if c not in held]
    lut = torch.full((num_classes,), -1, dtype=torch.int64)
    lut[kept] = torch.arange(len(kept))
    return lut


def _held_name(held: tuple[int, ...], names: Sequence[str]) -> str:
    parts = [str(c) if names[c] == str(c) else f"{c} ({names[c]})" for c in held]
    return "held-out classes " + ", ".join(parts)


def _hold_out(
    parts: dict, held: tuple[int, ...], names: tuple[str, ...], what: str
) -> tuple[dict, tuple[str, ...]]:
    """Remove the classes ``held`` from train and test of ``parts``; their test examples
    become ``x_ood``. Returns the new parts and class names."""
    num_classes = len(names)
    _check_held(held, num_classes, what)
    if not held:
        return parts, names
    lut = _remap(held, num_classes)
    out = dict(parts)
    for split in ("train", "test"):
        x, y = parts[f"x_{split}"], parts[f"y_{split}"]
        keep = lut[y] >= 0
        out[f"x_{split}"], out[f"y_{split}"] = x[keep], lut[y[keep]]
        if split == "test":
            out["x_ood"] = x[~keep]
    out["ood_name"] = _held_name(held, names)
    return out, tuple(n for c, n in enumerate(names) if c not in held)


# ----------------------------------------------------------------------------- digits


def _load_digits(seed: int, held: tuple[int, ...], test_fraction: float = 0.2) -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    names = tuple(str(c) for c in range(10))
    _check_held(held, 10, "digits")
    lut = _remap(held, 10)
    ood = lut[y] < 0
    x_in, y_in = x[~ood], lut[y[~ood]]
    perm = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x_in) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return dict(
        x_train=x_in[train],
        y_train=y_in[train],
        x_test=x_in[test],
        y_test=y_in[test],
        x_ood=x[ood] if held else None,
        num_classes=10 - len(held),
        class_names=tuple(n for c, n in enumerate(names) if c not in held),
        ood_name=_held_name(held, names) if held else None,
        augment=Augment(pad=1, jitter=0.2),
    )


# ----------------------------------------------------------------------------- cifar10


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches contain: numpy arrays and plain data."""

    def find_class(self, module: str, name: str) -> object:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array reconstructor
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return np.ndarray.__reduce_ex__(np.zeros(0), 5)[0]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return np.ndarray.__reduce__(np.float64(0))[0]
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3, protocol < 3
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not allowed")


def _unpickle(path: Path) -> object:
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def _cifar_error(path: Path, problem: str) -> DatasetError:
    return DatasetError(f"cifar10: {path}: {problem}; {_CIFAR_HINT}")


def _cifar_folder(data_dir: str | os.PathLike | None, what: str = "cifar10") -> Path:
    if data_dir is None:
        raise DatasetError(
            f"{what} needs data_dir, the folder with the CIFAR-10 python batches; {_CIFAR_HINT}"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise _cifar_error(folder, "no such folder")
    if (folder / _CIFAR_FOLDER).is_dir():
        folder = folder / _CIFAR_FOLDER
    return folder


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (n, 3072) uint8, labels (n,) int64)`` of one CIFAR-10 batch file."""
    if not path.is_file():
        raise _cifar_error(path, "missing")
    try:
        batch = _unpickle(path)
    except Exception as e:  # any unpickling failure: not a valid batch file
        msg = " ".join(str(e).split()) or type(e).__name__
        raise _cifar_error(path, f"not a valid CIFAR-10 pickle ({msg})") from None
    if not isinstance(batch, dict):
        raise _cifar_error(path, f"holds a {type(batch).__name__}, not a dict")
    got = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in got]
    if missing:
        raise _cifar_error(path, f"lacks the key(s) {', '.join(missing)}")
    data = got["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = (
            f"a {data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else f"a {type(data).__name__}"
        )
        raise _cifar_error(path, f"data is {desc}, expected a uint8 array (n, 3072)")
    if data.shape[1] != 3072:
        raise _cifar_error(path, f"data has shape {data.shape}, expected (n, 3072)")
    try:
        labels = np.asarray(got["labels"])
    except Exception:
        labels = np.asarray([None])
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise _cifar_error(path, "labels is not a list of integers")
    if len(labels) != len(data):
        raise _cifar_error(path, f"{len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise _cifar_error(
            path, f"labels range {labels.min()}..{labels.max()}, expected 0..9 (10 classes)"
        )
    return data, labels.astype(np.int64)


def _cifar_images(data: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, 3072)`` CHW rows -> normalised float32 ``(n, 3, 32, 32)``."""
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _cifar_names(folder: Path) -> tuple[str, ...]:
    path = folder / _CIFAR_META
    if not path.exists():
        return CIFAR10_CLASSES
    try:
        meta = _unpickle(path)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise _cifar_error(path, f"not a valid CIFAR-10 pickle ({msg})") from None
    names = None
    if isinstance(meta, dict):
        names = meta.get(b"label_names", meta.get("label_names"))
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise _cifar_error(path, "label_names is missing or is not a list of 10 names")
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    except UnicodeDecodeError:
        raise _cifar_error(path, "label_names are not UTF-8 text") from None


def _load_cifar10(data_dir: str | os.PathLike | None, held: tuple[int, ...]) -> dict:
    folder = _cifar_folder(data_dir)
    train = [_cifar_batch(folder / f) for f in _CIFAR_TRAIN]
    x_test, y_test = _cifar_batch(folder / _CIFAR_TEST)
    names = _cifar_names(folder)
    parts = dict(
        x_train=_cifar_images(np.concatenate([d for d, _ in train])),
        y_train=torch.from_numpy(np.concatenate([lab for _, lab in train])),
        x_test=_cifar_images(x_test),
        y_test=torch.from_numpy(y_test),
        x_ood=None,
        ood_name=None,
    )
    parts, names = _hold_out(parts, held, names, "cifar10")
    return dict(parts, num_classes=len(names), class_names=names, augment=Augment(pad=4, flip=True))


# ----------------------------------------------------------------------------- npz


def _npz_path(data_dir: str | os.PathLike | None, what: str = "npz") -> Path:
    if data_dir is None:
        raise DatasetError(f"{what} needs data_dir, the path of a .npz file")
    path = Path(data_dir)
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            listed = f" ({', '.join(p.name for p in found)})" if found else ""
            raise DatasetError(
                f"{what}: folder {path} holds {len(found)} .npz files{listed}, expected "
                f"exactly one; pass the file's path"
            )
        path = found[0]
    if not path.is_file():
        raise DatasetError(f"{what}: {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{what}: {path} is not a .npz (zip) file; save it with np.savez")
    return path


class _Npz:
    """Reads and checks the arrays of one ``.npz`` file (no pickles)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DatasetError(f"{path}: cannot be read as .npz ({_one_line(e)})") from None
        self.names = set(self.file.files)

    def __enter__(self) -> _Npz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def array(self, key: str) -> np.ndarray:
        if key not in self.names:
            raise DatasetError(
                f"{self.path}: array {key} is missing (it has: {', '.join(sorted(self.names))}; "
                f"required: x_train, y_train, x_test, y_test)"
            )
        try:
            a = self.file[key]
        except Exception as e:
            text = str(e).lower()
            if isinstance(e, ValueError) and ("pickle" in text or "object" in text):
                problem = "is an object (pickled) array; save plain numeric/string arrays"
            else:
                problem = f"cannot be read ({_one_line(e)})"
            raise DatasetError(f"{self.path}: array {key} {problem}") from None
        if a.dtype == object:
            raise DatasetError(f"{self.path}: array {key} is an object array")
        return a

    def inputs(self, key: str) -> torch.Tensor:
        """Array ``key`` as float32 ``(N, D)`` or ``(N, C, H, W)`` (layout rule of :func:`load`)."""
        a = self.array(key)
        where = f"{self.path}: array {key}"
        if a.dtype == np.uint8:
            x = torch.from_numpy(a.astype(np.float32) / np.float32(255.0))
        elif a.dtype.kind == "f":
            x = torch.from_numpy(a.astype(np.float32))
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).sum())
                raise DatasetError(f"{where} has {bad} non-finite value(s) (nan/inf)")
        else:
            raise DatasetError(f"{where} has dtype {a.dtype}; expected float or uint8")
        if x.dim() == 0 or len(x) == 0:
            raise DatasetError(f"{where} is empty or a scalar (shape {tuple(a.shape)})")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        elif x.dim() == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        elif x.dim() not in (2, 4):
            raise DatasetError(
                f"{where} has shape {tuple(a.shape)}; expected (N, D), (N, H, W), "
                f"(N, C, H, W) or (N, H, W, C)"
            )
        return x.contiguous()

    def labels(self, key: str, n: int) -> torch.Tensor:
        a = self.array(key)
        where = f"{self.path}: array {key}"
        if a.dtype.kind not in "iu":
            raise DatasetError(f"{where} has dtype {a.dtype}; expected integer labels")
        if a.ndim != 1:
            raise DatasetError(f"{where} has shape {tuple(a.shape)}; expected 1-D labels")
        if len(a) != n:
            x_key = "x_" + key[2:]
            raise DatasetError(f"{where} has {len(a)} labels for {n} examples in {x_key}")
        if len(a) and a.min() < 0:
            raise DatasetError(f"{where} has negative labels (min {a.min()}); expected 0..K-1")
        return torch.from_numpy(a.astype(np.int64))

    def class_names(self, num_classes: int) -> tuple[str, ...]:
        if "class_names" not in self.names:
            return tuple(str(c) for c in range(num_classes))
        a = self.array("class_names")
        where = f"{self.path}: array class_names"
        if a.dtype.kind not in "US" or a.ndim != 1:
            raise DatasetError(
                f"{where} has dtype {a.dtype} and shape {tuple(a.shape)}; expected a 1-D "
                f"array of strings"
            )
        if len(a) != num_classes:
            raise DatasetError(
                f"{where} has {len(a)} names for {num_classes} classes (largest y_train label + 1)"
            )
        return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in a)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _load_npz(
    data_dir: str | os.PathLike | None, held: tuple[int, ...], *, replace_ood: bool
) -> dict:
    path = _npz_path(data_dir)
    with _Npz(path) as npz:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            npz.array(key)  # name every missing array before reading any
        x_train = npz.inputs("x_train")
        y_train = npz.labels("y_train", len(x_train))
        x_test = npz.inputs("x_test")
        y_test = npz.labels("y_test", len(x_test))
        shape = tuple(x_train.shape[1:])
        if tuple(x_test.shape[1:]) != shape:
            raise DatasetError(
                f"{path}: x_test examples have shape {tuple(x_test.shape[1:])}, but x_train "
                f"examples have shape {shape}"
            )
        num_classes = int(y_train.max()) + 1
        if num_classes < 2:
            raise DatasetError(f"{path}: y_train has a single class; expected labels 0..K-1")
        if int(y_test.max()) >= num_classes:
            raise DatasetError(
                f"{path}: y_test has label {int(y_test.max())}, but y_train's labels are "
                f"0..{num_classes - 1} (K = largest y_train label + 1)"
            )
        names = npz.class_names(num_classes)
        x_ood, ood_name = None, None
        if "x_ood" in npz.names and not held and not replace_ood:
            x_ood, ood_name = npz.inputs("x_ood"), path.name
            if tuple(x_ood.shape[1:]) != shape:
                raise DatasetError(
                    f"{path}: x_ood examples have shape {tuple(x_ood.shape[1:])}, but "
                    f"x_train examples have shape {shape}"
                )
    parts = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    parts.update(x_ood=x_ood, ood_name=ood_name)
    parts, names = _hold_out(parts, held, names, str(path))
    image = x_train.dim() == 4
    return dict(
        parts,
        num_classes=len(names),
        class_names=names,
        augment=Augment(pad=max(1, x_train.shape[2] // 8)) if image else None,
    )


# ----------------------------------------------------------------------------- ood


def _load_ood(ood: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """The inputs of an ``ood`` path: a .npz file (``x_ood``, else ``x_test``) or a CIFAR-10
    folder (``test_batch``)."""
    path = Path(ood)
    if path.is_dir() and not any(path.glob("*.npz")):
        folder = _cifar_folder(path, "ood")
        data, _ = _cifar_batch(folder / _CIFAR_TEST)
        return _cifar_images(data), f"CIFAR-10 test set ({path.name})"
    if not path.exists():
        raise DatasetError(
            f"ood: {path}: no such file or folder (expected a .npz file or a CIFAR-10 folder)"
        )
    path = _npz_path(path, "ood")
    with _Npz(path) as npz:
        key = "x_ood" if "x_ood" in npz.names else "x_test"
        if key not in npz.names:
            raise DatasetError(f"ood: {path}: has neither x_ood nor x_test")
        return npz.inputs(key), path.name
