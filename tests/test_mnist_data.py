import gzip
import shutil
import struct

import pytest
import torch

from _mnist_common import FASHION_DIR, MNIST_DIR, needs_fashion, needs_mnist
from neuralode.datasets import mnist as data


def _write_idx(path, tensor, *, mtime=0):
    header = struct.pack(">HBB", 0, 8, tensor.ndim) + struct.pack(">" + "I" * tensor.ndim, *tensor.shape)
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=mtime) as gz:
        gz.write(header + tensor.numpy().tobytes())


def test_missing_files_error_names_folder_and_files(tmp_path):
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as exc:
        data.load_split(tmp_path, "train")
    msg = str(exc.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "--data-dir" in msg
    assert "train-labels-idx1-ubyte.gz" not in msg.split(":", 1)[1].split(".")[0]
    with pytest.raises(
        FileNotFoundError,
        match=r"train-images-idx3-ubyte\.gz, t10k-images-idx3-ubyte\.gz, t10k-labels-idx1-ubyte\.gz",
    ):
        data.load_splits(tmp_path)


def test_md5_mismatch_is_rejected(tmp_path):
    labels = torch.arange(10, dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError, match="md5 check failed"):
        data.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    # the parser itself is fine with the file
    assert torch.equal(data.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", check_md5=False), labels)


def test_bad_header_and_unknown_names(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00"))
    with pytest.raises(ValueError, match="unsigned-byte IDX header"):
        data.read_idx(p, check_md5=False)
    with pytest.raises(ValueError, match="not one of the mnist files"):
        data.read_idx(p)
    with pytest.raises(ValueError, match="dataset='kmnist'"):
        data.load_split(tmp_path, name="kmnist")
    with pytest.raises(ValueError, match="split='val'"):
        data.load_split(tmp_path, "val")


@needs_mnist
def test_real_md5_and_recompressed_copy_accepted(tmp_path):
    src = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    labels = data.read_idx(src)
    assert labels.shape == (10000,) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # same content, different gzip bytes (other mtime): accepted through the content md5
    _write_idx(tmp_path / src.name, labels, mtime=12345)
    assert torch.equal(data.read_idx(tmp_path / src.name), labels)
    # one label changed: rejected
    bad = labels.clone()
    bad[0] = 3
    _write_idx(tmp_path / src.name, bad)
    with pytest.raises(ValueError, match="md5 check failed"):
        data.read_idx(tmp_path / src.name)


@pytest.fixture(scope="module")
def splits():
    if MNIST_DIR is None:
        pytest.skip("MNIST IDX files not found")
    return data.load_splits(MNIST_DIR, val_size=1000, train_size=3000, seed=3)


def test_validation_split_is_held_out_of_train_and_never_touches_test(splits):
    tr, _ = data.load_split(MNIST_DIR, "train")
    te_x, te_y = data.load_split(MNIST_DIR, "test")
    assert splits.train_x.shape == (3000, 1, 28, 28) and splits.val_x.shape == (1000, 1, 28, 28)
    assert not set(splits.train_index.tolist()) & set(splits.val_index.tolist())
    assert splits.train_index.max() < 60000 and splits.val_index.max() < 60000
    # validation images are the training file's images at val_index, in [0, 1]
    assert torch.equal((splits.val_x[:, 0] * 255).round().to(torch.uint8), tr[splits.val_index])
    # the test tensors are exactly the test file
    assert torch.equal((splits.test_x[:, 0] * 255).round().to(torch.uint8), te_x)
    assert torch.equal(splits.test_y, te_y)
    # the split depends on the seed only, and the validation set does not depend on train_size
    again = data.load_splits(MNIST_DIR, val_size=1000, train_size=500, seed=3)
    assert torch.equal(again.val_index, splits.val_index)
    with pytest.raises(ValueError, match="train_size=60000"):
        data.load_splits(MNIST_DIR, val_size=1000, train_size=60000)


@needs_fashion
def test_fashion_mnist_through_the_same_loader():
    x, y = data.load_split(FASHION_DIR, "test", name="fashion-mnist")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and y.bincount().tolist() == [1000] * 10
    with pytest.raises(ValueError, match="md5 check failed"):
        data.load_split(FASHION_DIR, "test", name="mnist")  # wrong checksums table


def test_random_crop_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, 28, 28)
    out = data.random_crop(x, 4, g)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        assert any(
            torch.equal(out[i], xp[i, :, dy : dy + 28, dx : dx + 28]) for dy in range(9) for dx in range(9)
        )
    assert torch.equal(data.random_crop(x, 4, torch.Generator().manual_seed(0)), out)
    assert torch.equal(data.random_crop(x, 0), x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.random_crop(x[0])


def test_download_is_not_called_when_files_exist(tmp_path, monkeypatch):
    if MNIST_DIR is None:
        pytest.skip("MNIST IDX files not found")
    for f in data.DATASETS["mnist"].gz_md5:
        shutil.copy(MNIST_DIR / f, tmp_path / f)

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    assert data.download(tmp_path) == tmp_path


def test_truncated_empty_and_bit_flipped_files_are_clear_errors(tmp_path):
    labels = torch.arange(10, dtype=torch.uint8)
    good = tmp_path / "good.gz"
    _write_idx(good, labels)
    packed = good.read_bytes()
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    for content in (packed[: len(packed) // 2], b"", bytes(flipped)):
        p.write_bytes(content)
        with pytest.raises(ValueError, match="md5 check failed for .*t10k-labels-idx1-ubyte.gz") as exc:
            data.read_idx(p)
        assert "corrupt" in str(exc.value)
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="is not a complete gzip file"):
        data.read_idx(p, check_md5=False)
