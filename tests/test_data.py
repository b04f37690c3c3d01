"""Data loading: restricted unpickler, official CIFAR layout round trip, errors, augmentation."""
from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from ddi_hw import data
from ddi_hw.errors import UserError


def write_fake_cifar(root, n_train=20, n_test=10, seed=0):
    """A tiny CIFAR-10 directory in the official python layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES:
        n = n_test if name == "test_batch" else n_train
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y}, f)
        written[name] = (x, y)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"] * 10}, f)
    return written


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    evil = pickle.dumps({b"data": _Evil(), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        data.RestrictedUnpickler(__import__("io").BytesIO(evil), encoding="bytes").load()
    # through the loader: a one-line UserError, not code execution
    write_fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(evil)
    with pytest.raises(UserError, match="data_batch_3 is not a valid CIFAR-10 batch"):
        data.load_cifar10(tmp_path / "c")


def test_fake_cifar_round_trip_dir_and_targz(tmp_path):
    written = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load_cifar10(tmp_path / "cifar-10-batches-py")
    assert len(ds.train) == 100 and len(ds.test) == 10
    x3, y3 = written["data_batch_3"]
    # image 5 of batch 3 is global index 45; red plane first, row-major
    assert torch.equal(ds.train.images[45], torch.from_numpy(x3[5].reshape(3, 32, 32)))
    assert int(ds.train.labels[45]) == y3[5]
    assert ds.train.images[45, 1, 2, 3] == x3[5][1024 + 2 * 32 + 3]
    xt, yt = written["test_batch"]
    assert torch.equal(ds.test.labels, torch.tensor(yt))
    # the same from the .tar.gz and from the parent directory
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for src in (tgz, tmp_path):
        ds2 = data.load_cifar10(src)
        assert torch.equal(ds2.train.images, ds.train.images) and torch.equal(ds2.test.labels, ds.test.labels)


def test_missing_and_corrupt_data_errors(tmp_path):
    with pytest.raises(UserError, match="CIFAR-10 not found at .*pass --data-dir"):
        data.load_cifar10(tmp_path / "nope")
    write_fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(UserError, match="lacks test_batch"):
        data.load_cifar10(tmp_path / "c")
    write_fake_cifar(tmp_path / "d")
    (tmp_path / "d" / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_1 is not a valid"):
        data.load_cifar10(tmp_path / "d")
    with open(tmp_path / "d" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(UserError, match="N x 3072 uint8"):
        data.load_cifar10(tmp_path / "d")
    with pytest.raises(UserError, match="needs --data-dir"):
        data.load_dataset("cifar10", None)
    with pytest.raises(UserError, match="unknown data set"):
        data.load_dataset("mnist", tmp_path)


def test_random_crop_flip_matches_per_sample_reference():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    out = data.random_crop_flip(x, 8, 2, gen)
    gen = torch.Generator().manual_seed(3)  # replay the same draws
    oy = torch.randint(0, 5, (6,), generator=gen)
    ox = torch.randint(0, 5, (6,), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_train_batches_deterministic_and_partitioned(tmp_path):
    write_fake_cifar(tmp_path / "c", n_train=40)
    ds = data.load_cifar10(tmp_path / "c")  # 200 images; batch 16 x 2 ranks -> 6 steps/epoch
    a, ya = data.train_batch(ds, 7, 16, seed=1, rank=0, world_size=2)
    b, yb = data.train_batch(ds, 7, 16, seed=1, rank=0, world_size=2)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    epoch_idx = torch.cat([data.train_batch_indices(ds, s, 16, 1, r, 2) for s in range(6) for r in range(2)])
    assert len(set(epoch_idx.tolist())) == 6 * 32  # no image twice within an epoch, ranks disjoint
    assert not torch.equal(data.train_batch_indices(ds, 0, 16, 1), data.train_batch_indices(ds, 6, 16, 1))


def test_smoke_dataset_is_labelled_and_sized():
    ds = data.load_smoke()
    assert ds.smoke_test and "SMOKE" in ds.description
    assert ds.train.images.shape[1:] == (3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert len(ds.train) + len(ds.test) == 1797
    x, y, _ = next(data.test_batches(ds, 64))
    assert x.shape == (64, 3, 32, 32) and abs(float(x.mean())) < 0.5


def test_smoke_dataset_says_a_data_dir_is_not_used(tmp_path, capsys):
    data.load_dataset("smoke", None)
    assert capsys.readouterr().err == ""
    data.load_dataset("smoke", tmp_path)
    err = capsys.readouterr().err
    assert "not used" in err and str(tmp_path) in err and "dataset: cifar10" in err


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (300, 260), color).save(tmp_path / split / c / "a.png")
    ds = data.load_imagenet(tmp_path)
    assert ds.num_classes == 2 and len(ds.train) == 2
    x, y = ds.train.load(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 256, 256) and y.tolist() == [0, 1]
    assert int(x[0, 0, 10, 10]) == 255 and int(x[1, 2, 10, 10]) == 255
    xn, yt, raw = next(data.test_batches(ds, 2))
    assert raw.shape == (2, 3, 224, 224)
    with pytest.raises(UserError, match="expected .*/train/<class>"):
        data.load_imagenet(tmp_path / "missing")
