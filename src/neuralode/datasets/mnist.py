"""MNIST and Fashion-MNIST from the four standard IDX ``.gz`` files, as in-memory tensors.

The files are the ones every mirror distributes::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

:func:`load_split` reads one split of a folder holding them and checks each file's md5: a file passes
if the md5 of the ``.gz`` equals the published one (the value torchvision lists), or if the md5 of its
decompressed bytes equals the published content's (so a recompressed copy, such as Debian's
``dataset-fashion-mnist`` package, is accepted; a corrupt or different file is not).
:func:`load_splits` returns train / validation / test tensors: the validation images are held out of
the 60 000 training images with a seeded permutation, and the test images are never mixed in.
:func:`download` fetches the files into a cache folder for users with internet access (tests never
call it). :func:`random_crop` is the paper code's ``RandomCrop(28, padding=4)`` on a batch, in torch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import torch

__all__ = [
    "DATASETS",
    "FILES",
    "DatasetSpec",
    "Splits",
    "check_files",
    "default_data_dir",
    "download",
    "load_split",
    "load_splits",
    "random_crop",
    "read_idx",
]

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's four files come from and what their checksums are.

    ``gz_md5``: md5 of each published ``.gz`` file. ``raw_md5``: md5 of its decompressed IDX bytes.
    ``classes``: label names, index = label.
    """

    name: str
    mirrors: tuple[str, ...]
    gz_md5: dict[str, str]
    raw_md5: dict[str, str]
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        gz_md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        raw_md5={
            "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
        },
        classes=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        gz_md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        # Content checksums taken from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1, whose .gz
        # files
        # are recompressed (gzip mtime 2020-06-05) from upstream commit 55506a9.
        raw_md5={
            "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is unknown; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def default_data_dir(name: str = "mnist") -> Path:
    """``$NEURALODE_DATA/<name>`` if that variable is set, else ``~/.cache/neuralode/<name>``."""
    _spec(name)
    base = os.environ.get("NEURALODE_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "neuralode") / name


def check_files(
    root: str | os.PathLike, name: str = "mnist", splits: tuple[str, ...] = ("train", "test")
) -> Path:
    """Raise ``FileNotFoundError`` naming the folder and every missing file; return the folder."""
    _spec(name)
    root = Path(root).expanduser()
    wanted = [f for s in splits for f in FILES[s]]
    missing = [f for f in wanted if not (root / f).is_file()]
    if missing:
        hint = (
            "Fashion-MNIST: `apt-get install dataset-fashion-mnist` puts them in "
            "/usr/share/datasets/fashion-mnist"
            if name == "fashion-mnist"
            else "copy them there"
        )
        raise FileNotFoundError(
            f"{name} files missing in {str(root)!r}: {', '.join(missing)}. Pass the folder that holds them "
            f"(--data-dir), {hint}, or fetch them with neuralode.datasets.mnist.download({str(root)!r}, "
            f"name={name!r}) / `neuralode train mnist --download`."
        )
    return root


def read_idx(path: str | os.PathLike, *, name: str = "mnist", check_md5: bool = True) -> torch.Tensor:
    """Read one IDX ``.gz`` file into a ``uint8`` tensor of the shape its header gives.

    Raises ``ValueError`` if the md5 check fails (neither the ``.gz`` nor its content matches the
    published checksum) or the header is not an unsigned-byte IDX header.
    """
    path = Path(path)
    packed = path.read_bytes()
    spec = _spec(name)
    fix = "delete it and copy/download it again (or pass check_md5=False at your own risk)"
    if check_md5:
        key = path.name
        if key not in spec.gz_md5:
            raise ValueError(f"{str(path)!r} is not one of the {name} files {sorted(spec.gz_md5)}")
        gz_md5 = hashlib.md5(packed).hexdigest()  # checked before anything is decompressed
        if gz_md5 != spec.gz_md5[key]:
            try:  # a recompressed copy of the right content is accepted through the content md5
                raw = _gunzip(packed, path)
            except ValueError as exc:
                raise ValueError(
                    f"md5 check failed for {str(path)!r}: file md5 {gz_md5}, expected {spec.gz_md5[key]}, and "
                    f"{exc}. The file is corrupt (truncated or damaged); {fix}."
                ) from None
            raw_md5 = hashlib.md5(raw).hexdigest()
            if raw_md5 != spec.raw_md5[key]:
                raise ValueError(
                    f"md5 check failed for {str(path)!r}: file md5 {gz_md5}, content md5 {raw_md5}; "
                    f"expected file md5 {spec.gz_md5[key]} or content md5 {spec.raw_md5[key]}. The file is "
                    f"corrupt or not {name}; {fix}."
                )
        else:
            raw = _gunzip(packed, path)
    else:
        raw = _gunzip(packed, path)
    if len(raw) < 4:
        raise ValueError(f"{str(path)!r} is too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(
            f"{str(path)!r}: expected an unsigned-byte IDX header (0x0000 0x08), got {raw[:4].hex()}"
        )
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    n = 1
    for d in dims:
        n *= d
    if len(raw) - offset != n:
        raise ValueError(
            f"{str(path)!r}: header says {dims} ({n} bytes) but the file has {len(raw) - offset}"
        )
    data = torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8)
    return data.reshape(dims)


def _gunzip(packed: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(packed)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"{str(path)!r} is not a complete gzip file ({exc or type(exc).__name__})") from None


_CACHE: dict[tuple, tuple[tuple, torch.Tensor, torch.Tensor]] = {}


def load_split(
    root: str | os.PathLike, split: str = "train", *, name: str = "mnist", check_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` ``uint8`` and labels ``(N,)`` ``int64`` of ``split`` ("train"/"test")."""
    if split not in FILES:
        raise ValueError(f"split={split!r} is unknown; expected one of {sorted(FILES)}")
    root = check_files(root, name, (split,))
    img_file, lbl_file = FILES[split]
    # one read per process and file version (repeated runs in one process, e.g. tests, reuse it)
    key = (str(root.resolve()), split, name, check_md5)
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in ((root / f).stat() for f in FILES[split]))
    if key in _CACHE and _CACHE[key][0] == stamp:
        _, images, labels = _CACHE[key]
        return images.clone(), labels.clone()
    images = read_idx(root / img_file, name=name, check_md5=check_md5)
    labels = read_idx(root / lbl_file, name=name, check_md5=check_md5).long()
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair"
        )
    _CACHE[key] = (stamp, images, labels)
    return images.clone(), labels.clone()


@dataclasses.dataclass
class Splits:
    """Float images ``(N, 1, 28, 28)`` in [0, 1] and ``int64`` labels for train, validation and test.

    ``train_index`` / ``val_index``: positions in the original 60 000-image training file.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_index: torch.Tensor
    val_index: torch.Tensor


def load_splits(
    root: str | os.PathLike,
    *,
    name: str = "mnist",
    val_size: int = 5000,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    check_md5: bool = True,
) -> Splits:
    """Load all of a dataset and hold out a validation split from the training file.

    A permutation of the training file's indices drawn with ``seed`` gives the first ``val_size`` to
    validation and the next ``train_size`` (default: all the rest) to training. The two never overlap, and
    the test file only ever feeds ``test_x``. ``test_size`` keeps the first test images (quick runs only).
    """
    for arg, v in (("val_size", val_size), ("train_size", train_size), ("test_size", test_size)):
        if v is not None and (not isinstance(v, int) or v < 0):
            raise ValueError(f"{arg} must be a non-negative int or None, got {v!r}")
    check_files(root, name)
    tr_img, tr_lbl = load_split(root, "train", name=name, check_md5=check_md5)
    te_img, te_lbl = load_split(root, "test", name=name, check_md5=check_md5)
    n = tr_img.shape[0]
    if val_size >= n:
        raise ValueError(f"val_size={val_size} leaves no training images out of {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_index = perm[:val_size].sort().values
    rest = perm[val_size:]
    if train_size is not None:
        if train_size > rest.numel():
            raise ValueError(
                f"train_size={train_size} exceeds the {rest.numel()} images left after validation"
            )
        rest = rest[:train_size]
    train_index = rest.sort().values
    if test_size is not None:
        te_img, te_lbl = te_img[:test_size], te_lbl[:test_size]

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0).unsqueeze(1).contiguous()

    return Splits(
        train_x=f(tr_img[train_index]),
        train_y=tr_lbl[train_index].contiguous(),
        val_x=f(tr_img[val_index]),
        val_y=tr_lbl[val_index].contiguous(),
        test_x=f(te_img),
        test_y=te_lbl.contiguous(),
        train_index=train_index,
        val_index=val_index,
    )


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """``RandomCrop(size, padding)`` for a batch ``(N, C, H, W)``: zero-pad, then one random window per image.

    Offsets are drawn on the CPU from ``generator`` (so they do not depend on the device). Output shape
    equals the input's.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def download(root: str | os.PathLike | None = None, name: str = "mnist", *, timeout: float = 60.0) -> Path:
    """Fetch the four files into ``root`` (default :func:`default_data_dir`), trying each mirror in turn.

    Files already present with a valid checksum are kept. Needs internet access; tests never call this.
    """
    spec = _spec(name)
    root = Path(root).expanduser() if root is not None else default_data_dir(name)
    root.mkdir(parents=True, exist_ok=True)
    for fname in spec.gz_md5:
        target = root / fname
        if target.is_file():
            try:
                read_idx(target, name=name)
                continue
            except ValueError:
                target.unlink()
        errors = []
        for mirror in spec.mirrors:
            url = mirror + fname
            try:
                fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out)
                if hashlib.md5(Path(tmp).read_bytes()).hexdigest() != spec.gz_md5[fname]:
                    os.unlink(tmp)
                    errors.append(f"{url}: md5 mismatch")
                    continue
                os.replace(tmp, target)
                break
            except OSError as exc:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                errors.append(f"{url}: {exc}")
        else:
            raise RuntimeError(f"could not download {fname} for {name}: " + "; ".join(errors))
    return root
