"""Data sets for training and evaluation: CIFAR-10, ImageNet (class-per-folder) and a smoke set.

Why it looks like this:
- CIFAR-10 is read from the official "python version" layout, but through an unpickler that only
  knows the three numpy names a batch needs, so a crafted batch file cannot run code.
- Images stay in RAM as uint8 (CIFAR-10 train is 150 MB); augmentation (pad-4 random crop,
  horizontal flip) and normalisation run on whole batches of tensors, without torchvision.
- The batch for a training step is a pure function of (seed, step, rank, world size): the epoch
  permutation is seeded by (seed, epoch) and the augmentation by (seed, step, rank). A resumed run
  therefore sees exactly the batches an uninterrupted one would, with no sampler state to save.
- The built-in smoke set (scikit-learn's 8x8 digits resized to 32x32x3) needs no download so
  `ddi-hw train` runs on a fresh machine. It is labelled as a smoke test everywhere it is used:
  numbers measured on it say nothing about CIFAR-10.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ddi_hw.errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch"]
SMOKE_NAME = "smoke-digits"
DATASETS = ("cifar10", "imagenet", "smoke")

# A CIFAR-10 batch holds at most this many images of 3 x 32 x 32 bytes (the official ones: exactly).
CIFAR_BATCH_ROWS, CIFAR_ROW_BYTES = 10000, 3072
_ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}  # images uint8; labels as integers


class _NdarrayToken:
    """Stands for numpy.ndarray as the class argument of _reconstruct; calling it (which would
    allocate any shape the file asks for) is refused."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("a data file may not call numpy.ndarray directly")


_NDARRAY = _NdarrayToken()


class _ArrayStub:
    """What `_reconstruct` returns: the array is made only in BUILD, after its declared shape,
    dtype and byte count are checked against the CIFAR format (nothing is allocated before)."""

    array = None

    def build(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype.kind not in "ui":
            raise pickle.UnpicklingError(f"array dtype {dtype!r} is not an integer type")
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
            raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of integers")
        images = len(shape) == 2 and shape[1] == CIFAR_ROW_BYTES and dtype == np.uint8
        labels = len(shape) == 1
        if not (images or labels) or not 0 <= shape[0] <= CIFAR_BATCH_ROWS:
            raise pickle.UnpicklingError(f"array of shape {shape} {dtype}: CIFAR-10 data must be an N x "
                                         f"{CIFAR_ROW_BYTES} uint8 array with N <= {CIFAR_BATCH_ROWS}, "
                                         "labels N integers")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)) * dtype.itemsize:
            raise pickle.UnpicklingError(f"array of shape {shape} {dtype} does not come with its bytes")
        self.array = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct with arguments numpy never writes")
    return _ArrayStub()


def _dtype(code, align=False, copy=True):
    code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
    if code not in _ARRAY_DTYPES:
        raise pickle.UnpicklingError(f"dtype {code!r} is not allowed in a CIFAR-10 batch")
    return np.dtype(code)


def _latin1(text, encoding="latin1"):
    """Python 3's protocol-2 spelling of bytes: _codecs.encode(str, 'latin1'), nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as protocol 2's bytes (latin1)")
    return text.encode("latin1")


# The only globals a CIFAR-10 batch pickle refers to (numpy 1 and numpy 2 spellings, and the
# bytes of a protocol-2 pickle written by Python 3), each resolved to a checking stand-in.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that resolves only the numpy array-reconstruction names, to stand-ins
    that bound what they build (see _ArrayStub); anything else raises UnpicklingError."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a data file")
        return _ALLOWED_GLOBALS[(module, name)]

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _ArrayStub):
            inst.build(state)
        elif isinstance(inst, np.dtype):  # (version, byte order, ...): only the byte order matters
            order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
            order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
            if order not in ("<", ">", "|", "="):
                raise pickle.UnpicklingError(f"dtype state {state!r} is malformed")
            self.stack[-1] = inst.newbyteorder(order) if order in "<>" else inst
        else:
            raise pickle.UnpicklingError(f"a data file may not set the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def _arrays_out(obj):
    """Replace built array stand-ins by their arrays (top level of the batch dict)."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return obj.array
    return obj


def restricted_load(raw: bytes, what: str) -> dict:
    """Unpickle one CIFAR batch from bytes; `what` names the file in error messages."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
        if isinstance(obj, dict):
            obj = {k: _arrays_out(v) for k, v in obj.items()}
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, RecursionError, UnicodeDecodeError) as err:
        raise UserError(f"{what} is not a valid CIFAR-10 batch ({str(err)[:160]}); "
                        "re-extract cifar-10-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} is not a CIFAR-10 batch (expected a pickled dict); re-extract the archive")
    return obj


@dataclass
class ImageSet:
    """Images kept in memory as uint8 (N, 3, H, W) plus long labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Dataset:
    """A train and a test split with what is needed to turn their uint8 batches into inputs."""

    name: str
    train: ImageSource
    test: ImageSource
    num_classes: int
    image_size: int  # network input side after augmentation / center crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: int = 4  # padding for random crops (CIFAR); 0 for ImageNet (stored larger than the input)
    smoke_test: bool = False
    description: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.image_size, self.image_size)


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_batch_arrays(obj: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = obj.get(b"data"), obj.get(b"labels")
    if data is None or labels is None:
        raise UserError(f"{what} lacks b'data' or b'labels'; expected an official CIFAR-10 python batch")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{what}: b'data' must be an N x 3072 uint8 array, got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.zeros(0)  # reported below
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise UserError(f"{what}: b'labels' must be {data.shape[0]} integers in 0..9")
    return data, labels


def _read_cifar_files(data_dir: Path) -> dict[str, bytes]:
    """Raw bytes of the six batch files, from the extracted directory or the .tar.gz."""
    wanted = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    if not data_dir.exists():
        raise UserError(f"CIFAR-10 not found at {data_dir}: pass --data-dir pointing at the extracted "
                        "cifar-10-batches-py/ directory or at cifar-10-python.tar.gz")
    if data_dir.is_file():
        try:
            with tarfile.open(data_dir, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in wanted if n not in members]
                if missing:
                    raise UserError(f"{data_dir} lacks {', '.join(missing)}; "
                                    "expected the official cifar-10-python.tar.gz")
                return {n: tar.extractfile(members[n]).read() for n in wanted}
        except tarfile.TarError as err:
            raise UserError(f"{data_dir} is not a readable tar archive ({err}); "
                            "expected cifar-10-python.tar.gz") from None
    missing = [n for n in wanted if not (data_dir / n).is_file()]
    if missing:
        nested = data_dir / "cifar-10-batches-py"
        if nested.is_dir():
            return _read_cifar_files(nested)
        raise UserError(f"{data_dir} lacks {', '.join(missing)}; expected the extracted cifar-10-batches-py/ "
                        "directory (data_batch_1..5, test_batch)")
    return {n: (data_dir / n).read_bytes() for n in wanted}


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from the official python layout, held in memory as uint8."""
    data_dir = Path(data_dir).expanduser()
    raw = _read_cifar_files(data_dir)

    def split(names: list[str]) -> ImageSet:
        arrays = [_cifar_batch_arrays(restricted_load(raw[n], f"{data_dir}/{n}"), f"{data_dir}/{n}") for n in names]
        x = np.concatenate([a for a, _ in arrays]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b for _, b in arrays])
        return ImageSet(torch.from_numpy(x.copy()), torch.from_numpy(y))

    return Dataset("cifar10", split(CIFAR10_TRAIN_FILES), split(CIFAR10_TEST_FILES), 10, 32,
                   CIFAR10_MEAN, CIFAR10_STD, pad=4, description=f"CIFAR-10 sha256:{files_digest(raw)}")


def files_digest(raw: dict[str, bytes]) -> str:
    """Short content digest of a data set's files (name + bytes): runs name their data by it, not by
    the path it had on the machine that trained them."""
    h = hashlib.sha256()
    for name in sorted(raw):
        h.update(name.encode() + b"\0" + hashlib.sha256(raw[name]).digest())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- smoke set


def load_smoke(test_size: int = 297) -> Dataset:
    """scikit-learn digits (1797 images, 10 classes) resized to 32x32 RGB: a SMOKE-TEST data set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:test_size], order[test_size:]
    mean = float(x.float().mean() / 255)
    std = float(x.float().std() / 255)
    return Dataset(SMOKE_NAME, ImageSet(x[train], y[train]), ImageSet(x[test], y[test]), 10, 32,
                   (mean,) * 3, (std,) * 3, pad=4, smoke_test=True,
                   description="SMOKE TEST: sklearn digits resized to 32x32 (not CIFAR-10)")


# ----------------------------------------------------------------------------- ImageNet


class ImageFolder:
    """Class-per-folder images decoded with PIL on demand (ImageNet does not fit in RAM).

    Images are resized so the short side is `resize` and center-cropped to `store` x `store`;
    training then takes random `image_size` crops of that, evaluation the center crop.
    """

    EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jpe"}

    def __init__(self, root: Path, classes: list[str] | None = None, resize: int = 256, store: int = 256,
                 threads: int = 8):
        if not root.is_dir():
            raise UserError(f"image folder {root} not found: expected one sub-directory per class with images")
        self.classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise UserError(f"{root} has no class sub-directories: expected {root}/<class>/<image>.jpg")
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            d = root / cls
            if d.is_dir():
                self.samples += [(p, label) for p in sorted(d.iterdir()) if p.suffix.lower() in self.EXTENSIONS]
        if not self.samples:
            raise UserError(f"{root} has class folders but no images ({', '.join(sorted(self.EXTENSIONS))})")
        self.resize, self.store, self.threads = resize, store, threads

    def __len__(self) -> int:
        return len(self.samples)

    def _one(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.resize / min(w, h)
                im = im.resize((max(self.store, round(w * s)), max(self.store, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.store) // 2, (h - self.store) // 2
                im = im.crop((left, top, left + self.store, top + self.store))
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as err:
            raise UserError(f"cannot read image {path} ({err}); remove or replace the file") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [int(i) for i in idx]
        with ThreadPoolExecutor(self.threads) as pool:  # PIL decoding releases the GIL
            imgs = list(pool.map(self._one, ids))
        return torch.stack(imgs), torch.tensor([self.samples[i][1] for i in ids], dtype=torch.long)


def load_imagenet(data_dir: str | Path) -> Dataset:
    """ImageNet as `<data_dir>/train/<class>/*.JPEG` and `<data_dir>/val/<class>/*.JPEG`."""
    root = Path(data_dir).expanduser()
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(f"ImageNet not found: expected {root}/{sub}/<class>/<image>.JPEG (class-per-folder)")
    train = ImageFolder(root / "train", store=256)
    test = ImageFolder(root / "val", classes=train.classes, store=224)
    return Dataset("imagenet", train, test, len(train.classes), 224, IMAGENET_MEAN, IMAGENET_STD, pad=0,
                   description=f"ImageNet class-per-folder ({len(train)} train / {len(test)} val images, "
                               f"{len(train.classes)} classes)")


def load_dataset(name: str, data_dir: str | Path | None) -> Dataset:
    """Load a data set by name; cifar10 and imagenet need `data_dir`, smoke needs nothing."""
    if name not in DATASETS:
        raise UserError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    if name == "smoke":
        if data_dir is not None:  # a user pointing a smoke config at real data should know it is not used
            print(f"note: data set 'smoke' is the built-in sklearn digits; --data-dir {data_dir} is not used "
                  "(set dataset: cifar10 in the config to train on it)", file=sys.stderr)
        return load_smoke()
    if data_dir is None:
        raise UserError(f"data set '{name}' needs --data-dir (or use the built-in smoke-test set: dataset: smoke)")
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "imagenet":
        return load_imagenet(data_dir)
    raise UserError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- batches


def normalize(x_uint8: torch.Tensor, ds: Dataset) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def random_crop_flip(x: torch.Tensor, size: int, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (after zero padding by `pad`) and horizontal flip of a uint8 batch."""
    n, c, h, w = x.shape
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, h + 2 * pad - size + 1, (n,), generator=gen)
    ox = torch.randint(0, w + 2 * pad - size + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    ar = torch.arange(size)
    rows = (oy[:, None] + ar)[:, :, None]  # (n, size, 1)
    cols = ox[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (n, 1, size)
    out = x.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # (n, size, size, c)
    return out.permute(0, 3, 1, 2).contiguous()


def steps_per_epoch(ds: Dataset, batch_size: int, world_size: int = 1) -> int:
    spe = len(ds.train) // (batch_size * world_size)
    if spe < 1:
        raise UserError(f"batch size {batch_size} x {world_size} processes exceeds the {len(ds.train)} training images")
    return spe


def train_batch_indices(ds: Dataset, step: int, batch_size: int, seed: int, rank: int = 0,
                        world_size: int = 1) -> torch.Tensor:
    """Indices of this rank's batch at global `step`: a fresh seeded permutation every epoch."""
    spe = steps_per_epoch(ds, batch_size, world_size)
    epoch, pos = divmod(step, spe)
    perm = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (pos * world_size + rank) * batch_size
    return perm[start:start + batch_size]


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, normalised training batch for `step` (deterministic in its arguments)."""
    idx = train_batch_indices(ds, step, batch_size, seed, rank, world_size)
    x, y = ds.train.load(idx)
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) % (2**63))
    x = random_crop_flip(x, ds.image_size, ds.pad, gen)
    return normalize(x, ds), y


def center_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of uint8 images: as stored, or the center crop when stored larger."""
    if x.shape[-1] == size:
        return x
    off = (x.shape[-1] - size) // 2
    return x[..., off:off + size, off:off + size]


def clean_train_batch(ds: Dataset, i: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The i-th batch of training images in the evaluation view (no crop padding, no flip), from a
    fixed seeded order: what test images look like, for the training loop's saving calibration."""
    perm = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(seed * 100_003 + 7_919))
    start = (i * batch_size) % max(len(ds.train) - batch_size + 1, 1)
    x, y = ds.train.load(perm[start:start + batch_size])
    return normalize(center_view(x, ds.image_size), ds), y


def test_batches(ds: Dataset, batch_size: int, limit: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(normalised images, labels, uint8 images) over the test split in order, center view."""
    n = len(ds.test) if limit is None else min(limit, len(ds.test))
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x, y = ds.test.load(idx)
        x = center_view(x, ds.image_size)
        yield normalize(x, ds), y, x


def test_images(dataset: str, data_dir, limit: int | None, split: str = "test"):
    """(normalised float32 images, labels) as numpy, first `limit` of a split, centre view."""
    ds = load_dataset(dataset, data_dir)
    src = ds.test if split == "test" else ds.train
    n = len(src) if limit is None else min(limit, len(src))
    x, y = src.load(torch.arange(n))
    return normalize(center_view(x, ds.image_size), ds).numpy(), y.numpy()
