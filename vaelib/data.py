"""MNIST-format data, offline first.

The four IDX files of MNIST or Fashion-MNIST are looked for
  * in an explicit ``root=`` folder (CLI: ``--data-root``), else in the folder named by ``$VAELIB_DATA`` — and
    then only there: a folder given explicitly that lacks the files is an error naming what is missing, never a
    silent fall-through to some other copy;
  * otherwise in ``/usr/share/datasets/<name>`` (Debian: ``apt-get install dataset-fashion-mnist``),
    ``~/.cache/vaelib/<name>`` (where ``download=True`` puts them) and ``./data``, in that order;
each folder also in torchvision's layouts (``<folder>/<name>``, ``<folder>/FashionMNIST/raw``, ``<folder>/MNIST/raw``).
Files may be gzipped or raw. Their decompressed bytes are checked against the MD5 sums published with the
data sets, so a recompressed copy (Debian's) verifies and a truncated or altered one does not. A folder whose
label files are those of *another* known data set is skipped with a :class:`DataNote` (MNIST and Fashion-MNIST
have the same file names). Nothing is downloaded unless asked for, and then only through torchvision.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaelib.errors import VaelibError

DATA_ENV = "VAELIB_DATA"
SPLITS = ("train", "test")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the *decompressed* IDX files, as published with each data set.
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_APT_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist"}
CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}
DATASETS = tuple(_MD5)
_KNOWN_FILES = {md5: (name, stem) for name, sums in _MD5.items() for stem, md5 in sums.items()}
# IDX type code 0x08 = unsigned byte; the last byte of the magic number is the number of dimensions.
_IDX_UBYTE = 0x08


class DataError(VaelibError):
    """Base class for every data problem vaelib reports."""


class UnknownDatasetError(DataError, ValueError):
    """A data-set name vaelib does not know."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The IDX files are in none of the searched folders."""


class CorruptDataError(DataError):
    """A file exists but is truncated, has a wrong magic number or fails its checksum."""


class DataPermissionError(DataError, PermissionError):
    """A data file or folder exists but this user may not read it."""


class DataNote(UserWarning):
    """Something the data search did that the user should know (a folder skipped as another data set's)."""


@dataclass(frozen=True)
class Split:
    """One split: images (N, 28, 28) uint8 or (N, 784) float, and labels (N,) int64."""

    images: Tensor
    labels: Tensor
    name: str
    split: str
    source: Path


def canonical_name(name: str) -> str:
    """'fashion_mnist', 'FashionMNIST' and 'fashion-mnist' all mean 'fashion-mnist'."""
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    if key not in _MD5:
        raise UnknownDatasetError(f"unknown data set {name!r}; vaelib knows {', '.join(DATASETS)}")
    return key


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vaelib"


def _explicit_folder(root: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The folder the user named (``root=`` first, then ``$VAELIB_DATA``) and how it was named, or None."""
    if root is not None:
        return Path(root), ""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), f" (from ${DATA_ENV})"
    return None


def search_path(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for ``name``'s files, in order (see the module docstring)."""
    name = canonical_name(name)
    explicit = _explicit_folder(root)
    bases = [explicit[0]] if explicit else [Path("/usr/share/datasets"), default_cache_dir(), Path("data")]
    folders: list[Path] = []
    for base in bases:
        for sub in ("", name, f"{_TORCHVISION_DIR[name]}/raw"):
            folder = (base / sub) if sub else base
            if folder not in folders:
                folders.append(folder)
    return folders


def _is_file(path: Path) -> bool:
    """Like Path.is_file, but a folder this user may not enter raises PermissionError instead of hiding it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except PermissionError:
        raise
    except OSError:  # missing, not a directory on the way, a symlink loop
        return False


def _file_in(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if _is_file(candidate):
            return candidate
    return None


_STEMS = tuple(s for pair in _FILES.values() for s in pair)


def _other_dataset(name: str, folder: Path) -> str | None:
    """The known data set other than ``name`` whose label files ``folder`` holds (labels are small: cheap to hash)."""
    for stem in (_FILES["test"][1], _FILES["train"][1]):
        try:
            got = hashlib.md5(_read_bytes(_file_in(folder, stem))).hexdigest()
        except DataError:  # unreadable: load_split reports it if this folder is chosen
            return None
        owner = _KNOWN_FILES.get(got)
        if owner is not None and owner[0] != name and owner[1] == stem:
            return owner[0]
    return None


def find_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """The first folder on the search path that holds all four IDX files of ``name``.

    A folder holding another known data set's files is skipped (with a :class:`DataNote`). With an explicit
    ``root`` or ``$VAELIB_DATA`` only that folder's layouts are searched, and an error names what is missing.
    """
    name = canonical_name(name)
    searched = search_path(name, root)
    present: dict[Path, list[str]] = {}
    denied: list[Path] = []
    others: dict[Path, str] = {}
    for folder in searched:
        try:
            present[folder] = [s for s in _STEMS if _file_in(folder, s)]
        except PermissionError:
            denied.append(folder)
            continue
        if len(present[folder]) < len(_STEMS):
            continue
        other = _other_dataset(name, folder)
        if other is None:
            for skipped, what in others.items():  # (when nothing is found, the error says it instead)
                warnings.warn(f"skipped {skipped}: it holds {what}, not {name}", DataNote, stacklevel=2)
            return folder
        others[folder] = other
    explicit = _explicit_folder(root)
    if explicit is not None:
        raise _explicit_folder_error(name, *explicit, present, denied, others)
    message = _missing_message(name, searched)
    if others or denied:
        message += "".join(f" ({folder} holds {other}, not {name}.)" for folder, other in others.items())
        message += "".join(f" (Permission denied: {folder}.)" for folder in denied)
    raise DataNotFoundError(message)


def _explicit_folder_error(name: str, base: Path, how: str, present: dict[Path, list[str]], denied: list[Path],
                           others: dict[Path, str]) -> DataError:
    where = f"the data folder {base}{how}"
    if denied and base in denied:
        return DataPermissionError(f"permission denied: cannot look into {where}")
    try:
        kind = base.stat().st_mode
    except PermissionError:
        return DataPermissionError(f"permission denied: cannot look into {where}")
    except OSError:
        return DataNotFoundError(f"{name} data not found: {where} does not exist")
    if not stat.S_ISDIR(kind):
        return DataNotFoundError(f"{name} data not found: {where} is not a directory")
    if others:
        folder, other = next(iter(others.items()))
        return DataNotFoundError(f"{name} data not found in {where}: {folder} holds {other}, not {name}")
    best = max(present, key=lambda f: len(present[f]), default=base)
    missing = [s for s in _STEMS if s not in present.get(best, [])]
    also = [str(f) for f in present if f != best]
    return DataNotFoundError(
        f"{name} data not found in {where}: {best} lacks {', '.join(missing)} (.gz or raw)"
        + (f"; also looked in {', '.join(also)}" if also else "")
        + (f"; permission denied: {', '.join(map(str, denied))}" if denied else ""))


def _missing_message(name: str, searched: list[Path]) -> str:
    how = [f"set ${DATA_ENV} to a folder holding the four IDX files (.gz or raw)"]
    if name in _APT_PACKAGE:
        how.insert(0, f"install Debian's package: sudo apt-get install {_APT_PACKAGE[name]}")
    how.append(f"or, with a network, load_split({name!r}, download=True) / "
               f"`python -m vaelib data {name} --download` (needs torchvision)")
    shown = ", ".join(str(p) for p in searched[:6]) + (", ..." if len(searched) > 6 else "")
    return f"{name} data not found (searched {shown}). To get it: " + "; ".join(how) + "."


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except PermissionError as err:
        raise DataPermissionError(f"{path}: permission denied (this user may not read the data file)") from err
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # cut short, a damaged deflate stream, not gzip
        raise CorruptDataError(f"{path}: cannot be decompressed ({err}); the file is truncated or corrupt") from err
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err


def parse_idx(raw: bytes, source: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode an IDX byte string (unsigned-byte data only) into an array of its declared shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex()
        raise CorruptDataError(f"{source}: wrong magic number 0x{magic} (expected 0x000008NN, unsigned-byte IDX)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CorruptDataError(f"{source}: IDX header is truncated or declares {ndim} dimensions")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"{source}: header declares shape {shape} ({expected} bytes) but the file holds {len(raw) - header}"
            " bytes of data; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike, md5: str | None = None) -> np.ndarray:
    """Read one IDX file (.gz or raw); with ``md5``, check its decompressed bytes first."""
    path = Path(path)
    raw = _read_bytes(path)
    if md5 is not None:
        got = hashlib.md5(raw).hexdigest()
        if got != md5:
            if got in _KNOWN_FILES:  # a valid file, of another data set (or in another file's place)
                other, stem = _KNOWN_FILES[got]
                raise CorruptDataError(
                    f"{path}: checksum mismatch: this is {other}'s {stem} (md5 {got}), not the file expected "
                    f"here (md5 {md5}); point vaelib at the folder of the data set you want")
            raise CorruptDataError(
                f"{path}: checksum mismatch (md5 of the decompressed bytes is {got}, expected {md5}); "
                "the file is corrupt or altered. Delete it and get the data again.")
    return parse_idx(raw, path)


def dynamic_binarize(x: Tensor, generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
    """Sample each pixel as Bernoulli(intensity): the binarisation of Burda et al. (2015), redrawn per use.

    Drawn as [u < p] with u ~ U[0, 1), into ``out`` when given (fit redraws its training buffer in place every
    epoch): half the CPU time of ``torch.bernoulli`` (0.21 s vs 0.42 s for the 60,000 x 784 Fashion-MNIST
    pixels), and on the CPU the same bits as ``torch.bernoulli`` with the same generator.
    """
    if out is None:
        out = torch.empty_like(x)
    return out.uniform_(generator=generator).lt_(x)


def load_split(
    name: str = "fashion-mnist",
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    dtype: str = "float",
    flatten: bool = True,
    binarize: str | None = None,
    seed: int = 0,
    download: bool = False,
    verify: bool = True,
) -> Split:
    """Load one split of MNIST or Fashion-MNIST.

    dtype "float" gives intensities in [0, 1] (float32), "uint8" the raw bytes. ``binarize`` may be
    "dynamic" (one Bernoulli draw with ``seed``; see :func:`dynamic_binarize` to redraw) or "threshold" (> 0.5).
    """
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dtype not in ("float", "uint8"):
        raise ValueError(f"dtype must be 'float' or 'uint8', got {dtype!r}")
    if binarize not in (None, "dynamic", "threshold"):
        raise ValueError(f"binarize must be None, 'dynamic' or 'threshold', got {binarize!r}")
    if binarize is not None and dtype == "uint8":
        raise ValueError("binarize needs dtype='float'")
    try:
        folder = find_dataset(name, root)
    except DataNotFoundError:
        if not download:
            raise
        folder = download_dataset(name, root)
    image_stem, label_stem = _FILES[split]
    sums = _MD5[name] if verify else {}
    images = read_idx(_file_in(folder, image_stem), sums.get(image_stem))
    labels = read_idx(_file_in(folder, label_stem), sums.get(label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptDataError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.copy())
    if dtype == "float":
        x = x.to(torch.float32).div_(255.0)
    if flatten:
        x = x.reshape(len(x), -1)
    if binarize == "dynamic":
        x = dynamic_binarize(x, torch.Generator().manual_seed(seed))
    elif binarize == "threshold":
        x = (x > 0.5).to(x.dtype)
    return Split(x, torch.from_numpy(labels.astype(np.int64)), name, split, folder)


def download_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """Download through torchvision into ``root`` (default ``~/.cache/vaelib``); return the folder."""
    name = canonical_name(name)
    target = Path(root) if root is not None else default_cache_dir()
    try:
        import torchvision.datasets as tvd  # optional: only needed to download
    except Exception as err:  # ImportError, or torchvision built against another torch
        raise DataNotFoundError(
            f"cannot download {name}: torchvision is not importable ({err}). "
            + _missing_message(name, search_path(name, root))) from err
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as err:  # no network, host down, ...
        raise DataNotFoundError(f"download of {name} failed ({err}). " + _missing_message(
            name, search_path(name, root))) from err
    return find_dataset(name, target)


__all__ = [
    "CLASS_NAMES", "DATASETS", "DATA_ENV", "CorruptDataError", "DataError", "DataNote", "DataNotFoundError",
    "DataPermissionError", "Split",
    "UnknownDatasetError", "canonical_name", "download_dataset", "dynamic_binarize", "find_dataset",
    "load_split", "parse_idx", "read_idx", "search_path",
]
