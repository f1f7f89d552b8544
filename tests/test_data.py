"""vaelib.data: the IDX reader, the search path, checksums and every failure, on small files written here."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelib import data
from vaelib.data import (
    CorruptDataError,
    DataNotFoundError,
    UnknownDatasetError,
    find_dataset,
    load_split,
    parse_idx,
    read_idx,
)

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_dataset(folder: Path, n: int = 6, gz: bool = True) -> dict[str, bytes]:
    """Write the four files of a tiny MNIST-format data set; return the raw bytes by stem."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for img, lab in STEMS.values():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, arr in ((img, images), (lab, labels)):
            raw = idx_bytes(arr)
            written[stem] = raw
            if gz:
                with gzip.open(folder / f"{stem}.gz", "wb") as fh:
                    fh.write(raw)
            else:
                (folder / stem).write_bytes(raw)
    return written


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No real data visible: the env var, the cache and the working directory point into tmp_path."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "search_path", _without_system(data.search_path))
    return tmp_path


def _without_system(search_path):
    def patched(name, root=None):
        return [p for p in search_path(name, root) if not str(p).startswith("/usr/share/datasets")]
    return patched


def test_parse_idx_roundtrip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


def test_wrong_magic_number(tmp_path):
    raw = bytearray(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    raw[2] = 0x0D  # float32 type code: not unsigned-byte IDX
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="wrong magic number"):
        read_idx(path)


def test_truncated_raw_file(tmp_path):
    raw = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(raw[:-100])
    with pytest.raises(CorruptDataError, match="truncated"):
        read_idx(path)


def test_truncated_gzip_file(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(5 * 28 * 28).reshape(5, 28, 28).astype(np.uint8)))
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(CorruptDataError, match="truncated or corrupt"):
        read_idx(path)


def test_checksum_mismatch_names_file(tmp_path):
    write_fake_dataset(tmp_path / "d")
    with pytest.raises(CorruptDataError, match="checksum mismatch"):
        load_split("fashion-mnist", "train", root=tmp_path / "d")


def test_checksum_match_accepts(tmp_path):
    raw = idx_bytes(np.ones((3, 2), np.uint8))
    (tmp_path / "f").write_bytes(raw)
    assert read_idx(tmp_path / "f", md5=hashlib.md5(raw).hexdigest()).shape == (3, 2)


def test_unknown_dataset_name():
    with pytest.raises(UnknownDatasetError, match="unknown data set 'cifar'"):
        load_split("cifar")
    assert data.canonical_name("FashionMNIST") == "fashion-mnist"
    assert data.canonical_name("fashion_mnist") == "fashion-mnist"


def test_missing_data_message_says_how_to_get_it(isolated):
    with pytest.raises(DataNotFoundError) as info:
        load_split("fashion-mnist", "train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert data.DATA_ENV in message
    assert "download=True" in message


@pytest.mark.parametrize("gz", [True, False])
def test_search_path_env_var_and_layouts(isolated, monkeypatch, gz):
    root = isolated / "mydata"
    written = write_fake_dataset(root / "FashionMNIST" / "raw", gz=gz)  # torchvision's layout
    monkeypatch.setenv(data.DATA_ENV, str(root))
    assert find_dataset("fashion-mnist") == root / "FashionMNIST" / "raw"
    split = load_split("fashion-mnist", "test", dtype="uint8", flatten=False, verify=False)
    expected = parse_idx(written["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(split.images.numpy(), expected)
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64


def test_explicit_root_wins_over_env(isolated, monkeypatch):
    write_fake_dataset(isolated / "env")
    write_fake_dataset(isolated / "explicit")
    monkeypatch.setenv(data.DATA_ENV, str(isolated / "env"))
    assert find_dataset("mnist", root=isolated / "explicit") == isolated / "explicit"


def test_float_and_binarised(isolated):
    write_fake_dataset(isolated / "d")
    x = load_split("mnist", "train", root=isolated / "d", verify=False).images
    assert x.dtype == torch.float32 and x.shape == (6, 784) and 0 <= x.min() and x.max() <= 1
    b = load_split("mnist", "train", root=isolated / "d", verify=False, binarize="dynamic", seed=1).images
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    again = load_split("mnist", "train", root=isolated / "d", verify=False, binarize="dynamic", seed=1).images
    assert torch.equal(b, again)  # the seed fixes the draw
    t = load_split("mnist", "train", root=isolated / "d", verify=False, binarize="threshold").images
    assert torch.equal(t, (x > 0.5).float())


def test_bad_arguments(isolated):
    write_fake_dataset(isolated / "d")
    with pytest.raises(ValueError, match="split"):
        load_split("mnist", "validation", root=isolated / "d")
    with pytest.raises(ValueError, match="binarize"):
        load_split("mnist", "train", root=isolated / "d", binarize="yes")
    with pytest.raises(ValueError, match="dtype"):
        load_split("mnist", "train", root=isolated / "d", dtype="float64")


def test_download_without_torchvision_is_clear(isolated, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(DataNotFoundError, match="torchvision is not importable"):
        load_split("mnist", "train", download=True)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's data not installed")
def test_real_fashion_mnist_verifies():
    test = load_split("fashion-mnist", "test")
    assert test.images.shape == (10_000, 784) and test.labels.bincount().tolist() == [1000] * 10
