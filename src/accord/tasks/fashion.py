"""A small CNN on Fashion-MNIST (28x28 grey images of clothing, 10 classes), read from disk.

Data: the four IDX files of the official release (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
plain or gzipped), parsed here with numpy. They are looked up in ``--data-dir``, else in
``$ACCORD_FASHION_MNIST_DIR``, else in ``/usr/share/datasets/fashion-mnist``, where the
Debian package ``dataset-fashion-mnist`` installs them (``make data`` does it when it can).
Nothing is downloaded at run time.

Split: the official one. Each worker draws shuffled epochs over the 60,000 training images
from its own generator. Evaluation uses a fixed subset of 2,000 of the 10,000 test images
(chosen with a constant seed, the same for every run and every ``--seed``) so that one
evaluation takes well under a second on one core; at 85% accuracy the standard error of
``eval_acc`` on 2,000 images is about 0.8 points.

``split="val"`` evaluates instead on a fixed subset of 2,000 *training* images (chosen with
its own constant seed VAL_SEED, the same for every run and every ``--seed``; a fifth of the
training images if there are fewer than 10,000) and removes them from the training data:
every worker's stream draws from the other 58,000 only, and the standardisation below uses
their pixels only. The test images are not used. Ids (:meth:`FashionMNIST.split_ids`):
training image i is i, test image j is n_train + j (60,000 + j for the official files).

Inputs: pixels scaled to [0, 1], then standardised with the mean and standard deviation of
all training pixels (computed at load time, so they depend on the data only; under
``split="val"`` of the training images that remain for training).

Model: conv 3x3 1->8, ReLU, max-pool 2; conv 3x3 8->16, ReLU, max-pool 2; linear
16*7*7 -> 10; 9,098 parameters. Twice the channels learns no faster in a few hundred steps
and costs four times as much per image, which matters with 8 workers on 2 cores. No
BatchNorm and no dropout: the forward pass has no state and no randomness, so train and
eval mode are the same.

Metrics: ``eval_loss`` (mean cross-entropy, nats) and ``eval_acc`` on the test subset.

Defaults: plain SGD, lr 0.1, 32 images per worker. With allreduce that reaches about 76%
test accuracy in 100 steps on 2 workers and 85% in 300 steps on 4; lr 0.2 learns a little
faster alone but is near the edge (0.3 already does worse).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ClassificationTask, register_task, shuffled_batches

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "ACCORD_FASHION_MNIST_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = 10
SIDE = 28
EVAL_IMAGES = 2000
EVAL_CHUNK = 500
SPLIT_SEED = 0  # fixes the evaluation subset; independent of the run seed on purpose
VAL_SEED = 1  # fixes the validation images (split="val"); independent of the run seed too
VAL_MAX_FRACTION = 0.2  # validation images at most this fraction of the training images

# IDX type codes (third byte of the magic number) and their big-endian numpy types
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def resolve_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _open(path: Path) -> BinaryIO:
    # Decide by content, not by suffix: a decompressed copy may keep its .gz name.
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _parse_header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", head[4: 4 + 4 * ndim])
    return np.dtype(_IDX_TYPES[head[2]]), dims


def read_idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Element type and shape of an IDX file (plain or gzipped), reading only its header."""
    with _open(path) as f:
        head = f.read(4)
        if len(head) == 4:
            head += f.read(4 * head[3])
    return _parse_header(path, head)


def read_idx(path: Path) -> np.ndarray:
    """The whole array stored in an IDX file (plain or gzipped), in native byte order."""
    with _open(path) as f:
        raw = f.read()
    dtype, dims = _parse_header(path, raw[:4 + 4 * raw[3]] if len(raw) >= 4 else raw)
    offset = 4 + 4 * len(dims)
    count = math.prod(dims)
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - offset} data bytes, expected "
                         f"{count * dtype.itemsize} for shape {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _expected_shapes(paths: dict[str, Path]) -> None:
    """Check the four headers agree with Fashion-MNIST's layout; ValueError otherwise."""
    shapes = {key: read_idx_header(path)[1] for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = shapes[f"{part}_images"], shapes[f"{part}_labels"]
        if len(images) != 3 or images[1:] != (SIDE, SIDE) or len(labels) != 1:
            raise ValueError(f"{paths[f'{part}_images']}: shape {images} with labels {labels}, "
                             f"expected (n, {SIDE}, {SIDE}) images and (n,) labels")
        if images[0] != labels[0] or images[0] == 0:
            raise ValueError(f"{paths[f'{part}_images']}: {images[0]} images but "
                             f"{labels[0]} labels")


# (path, size, mtime) of files whose content was checked: a bench plan validates many runs
_CHECKED: set[tuple[str, int, int]] = set()


def _size_matches(path: Path, size: int) -> bool:
    """Whether the file's (uncompressed) size is ``size``, from the file size or the gzip
    trailer (its last 4 bytes: the size mod 2^32), without decompressing 47 MB in every
    worker; on a mismatch the caller counts the bytes to name the problem."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return path.stat().st_size == size
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:  # a gzip header and trailer alone
            return False
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0] == size % (1 << 32)


def _data_bytes(path: Path) -> int:
    """Bytes after the IDX header, counted through the decompression of a gzipped file
    (in chunks: the training images are 47 MB)."""
    with _open(path) as f:
        head = f.read(4)
        if len(head) == 4:
            f.read(4 * head[3])
        total = 0
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def check_content(paths: dict[str, Path]) -> None:
    """Every file holds exactly the bytes its header announces, and every label is a class;
    ValueError naming the file otherwise (a truncated download fails here, not in a worker)."""
    for key, path in paths.items():
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        if stamp in _CHECKED:
            continue
        dtype, dims = read_idx_header(path)
        expected = math.prod(dims) * dtype.itemsize
        if not _size_matches(path, 4 + 4 * len(dims) + expected):
            found = _data_bytes(path)
            if found != expected:
                raise ValueError(f"{path}: {found} data bytes, expected {expected} for shape "
                                 f"{dims} (truncated or corrupt)")
        if key.endswith("labels"):
            _labels(path)
        _CHECKED.add(stamp)


def _paths(data_dir: str | None) -> dict[str, Path]:
    directory = resolve_dir(data_dir)
    found = {key: _find(directory, name) for key, name in FILES.items()}
    missing = [FILES[key] for key, path in found.items() if path is None]
    if missing:
        need = ", ".join(f"{name}[.gz]" for name in missing)
        raise ValueError(f"Fashion-MNIST not found in {directory} (need {need}); install it "
                         "with `apt-get install dataset-fashion-mnist`, or pass --data-dir / "
                         f"set {ENV_VAR}")
    return found


def _labels(path: Path) -> torch.Tensor:
    y = read_idx(path).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= CLASSES):
        raise ValueError(f"{path}: labels outside 0..{CLASSES - 1}")
    return torch.from_numpy(y)


def _pixel_stats(images: torch.Tensor, exclude: torch.Tensor | None = None
                 ) -> tuple[float, float]:
    """Mean and standard deviation of all pixels scaled to [0, 1], exactly, from a histogram
    of the 256 byte values (no float copy of the whole training set); the images numbered
    ``exclude`` left out (their histogram subtracted, no copy of the others either)."""
    counts = torch.bincount(images.flatten(), minlength=256)
    if exclude is not None:
        counts = counts - torch.bincount(images[exclude].flatten(), minlength=256)
    counts = counts.double()
    values = torch.arange(256, dtype=torch.float64) / 255.0  # host: load-time stats
    total = counts.sum()
    mean = float(counts @ values / total)
    var = float(counts @ (values - mean) ** 2 / total)
    return mean, math.sqrt(var) if var > 0 else 1.0


def validation_split(n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation images, remaining training images) of ``n_train`` training images under
    split="val", both sorted: min(EVAL_IMAGES, a fifth of them) chosen with VAL_SEED."""
    n_val = min(EVAL_IMAGES, max(1, int(n_train * VAL_MAX_FRACTION)))
    pick = torch.randperm(n_train, generator=torch.Generator().manual_seed(VAL_SEED))
    return pick[:n_val].sort().values, pick[n_val:].sort().values


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * (SIDE // 4) ** 2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_task
class FashionMNIST(ClassificationTask):
    name = "fashion"
    eval_tensors = ("x_test", "y_test")
    description = ("CNN (2 conv + linear, 9k params) on Fashion-MNIST from disk, official "
                   "split, fixed 2,000-image test subset")
    has_accuracy = True
    default_lr = 0.1
    default_batch_size = 32
    # about 80 KB of activations per image in the forward and backward pass
    max_batch_size = 8192
    max_batch_note = "about 0.7 GB of activations per worker and micro-batch"

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        super().__init__(seed, data_dir, split)
        paths = _paths(data_dir)
        _expected_shapes(paths)
        # Kept as uint8 and converted per batch: 47 MB instead of 188 MB per worker process.
        self.train_images = torch.from_numpy(read_idx(paths["train_images"]).astype(np.uint8))
        self.train_labels = _labels(paths["train_labels"])
        n_train = len(self.train_images)
        if split == "val":
            val, self.train_index = validation_split(n_train)
            self.mean, self.std = _pixel_stats(self.train_images, exclude=val)
            # x_test / y_test hold the evaluated images whatever the split
            self.x_test = self._inputs(self.train_images[val])
            self.y_test = self.train_labels[val]
            self.eval_ids = val
            return
        # split="test": exactly as before split existed
        self.train_index = None  # the stream draws from every training image
        self.mean, self.std = _pixel_stats(self.train_images)
        test_images = torch.from_numpy(read_idx(paths["test_images"]).astype(np.uint8))
        test_labels = _labels(paths["test_labels"])
        n_test = len(test_images)
        pick = torch.randperm(n_test, generator=torch.Generator().manual_seed(SPLIT_SEED))
        pick = pick[:min(EVAL_IMAGES, n_test)].sort().values
        self.x_test = self._inputs(test_images[pick])
        self.y_test = test_labels[pick]
        self.eval_ids = n_train + pick

    def split_ids(self) -> dict[str, torch.Tensor | None]:
        train = (torch.arange(len(self.train_images)) if self.train_index is None  # host: ids
                 else self.train_index.clone())
        return {"train": train, "eval": self.eval_ids.clone()}

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1).float() / 255.0
        return (x - self.mean) / self.std

    @classmethod
    def check_data(cls, data_dir: str | None) -> None:
        paths = _paths(data_dir)
        try:
            _expected_shapes(paths)
            check_content(paths)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise ValueError(f"Fashion-MNIST in {resolve_dir(data_dir)} is unreadable: "
                             f"{str(e).splitlines()[0]}; reinstall it with `apt-get install "
                             "--reinstall dataset-fashion-mnist`") from None

    def _model(self) -> nn.Module:
        return _CNN()

    def train_stream(self, rank: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.train_index is None:
            for idx in shuffled_batches(len(self.train_images), batch_size, self.seed, rank):
                yield self._inputs(self.train_images[idx]), self.train_labels[idx]
            return
        # split="val": positions in the list of the remaining training images
        for pos in shuffled_batches(len(self.train_index), batch_size, self.seed, rank):
            idx = self.train_index[pos]
            yield self._inputs(self.train_images[idx]), self.train_labels[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # Chunked: the first conv's output for 2,000 images at once would be 50 MB.
        logits = torch.cat([model(x) for x in self.x_test.split(EVAL_CHUNK)])
        return {
            "eval_loss": float(F.cross_entropy(logits, self.y_test)),
            "eval_acc": float((logits.argmax(-1) == self.y_test).float().mean()),
        }
