"""Dataset sources: the built-in digits, the prepared npz format, and the official layouts of GTSRB and
Tiny-ImageNet on small synthetic folders (the real ones are not available offline)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.datasets import CIFAR10, DATASETS, GTSRB, Digits, TinyImageNet, get_dataset, write_npz


def test_registry_names_match_specs() -> None:
    assert sorted(DATASETS) == ["cifar10", "digits", "gtsrb", "tiny_imagenet"]
    for name, cls in DATASETS.items():
        assert cls.spec.name == name
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10"):
        get_dataset("mnist")


def test_digits_split_and_statistics(tmp_path) -> None:
    x, y = Digits().load(tmp_path, "train")
    xt, yt = Digits().load(tmp_path, "test")
    assert x.shape == (1438, 3, 32, 32) and xt.shape == (359, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(yt).min() >= 35 and len(x) + len(xt) == 1797
    x2, _ = Digits().load(tmp_path, "train")
    assert torch.equal(x, x2), "the split is fixed"
    f = x.float() / 255
    assert f.mean().item() == pytest.approx(Digits.spec.mean[0], abs=1e-3)
    assert f.std().item() == pytest.approx(Digits.spec.std[0], abs=1e-3)


def test_prepared_npz_is_read_first(tmp_path) -> None:
    x = np.full((4, 32, 32, 3), 9, dtype=np.uint8)
    write_npz(tmp_path / "digits" / "train.npz", x, np.array([0, 1, 2, 3]))
    images, labels = Digits().load(tmp_path, "train")
    assert images.shape == (4, 3, 32, 32) and (images == 9).all() and labels.tolist() == [0, 1, 2, 3]


def test_a_process_reads_a_file_once_and_hands_out_copies(tmp_path, monkeypatch) -> None:
    """The second load of an unchanged file comes from memory, as a copy a caller may write into; a rewritten file
    (write_npz replaces it) is read again; a file of another dataset's shape is still refused."""
    from datamodules.datasets import base

    original, reads = base.read_npz, []

    def counted(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(base, "read_npz", counted)
    path = tmp_path / "cifar10" / "train.npz"
    write_npz(path, np.full((4, 32, 32, 3), 9, dtype=np.uint8), np.array([0, 1, 2, 3]))
    first, _ = CIFAR10().load(tmp_path, "train")
    first[:] = 0  # the caller's copy
    again, labels = CIFAR10().load(tmp_path, "train")
    assert len(reads) == 1 and (again == 9).all() and labels.tolist() == [0, 1, 2, 3]
    write_npz(path, np.full((4, 32, 32, 3), 7, dtype=np.uint8), np.array([3, 2, 1, 0]))
    rewritten, labels = CIFAR10().load(tmp_path, "train")
    assert len(reads) == 2 and (rewritten == 7).all() and labels.tolist() == [3, 2, 1, 0]
    write_npz(tmp_path / "tiny_imagenet" / "train.npz", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"uint8 \(N, 64, 64, 3\)"):
        TinyImageNet().load(tmp_path, "train")


def test_missing_file_says_how_to_get_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar10/train\.npz not found.*python -m datamodules\.prepare cifar10"):
        CIFAR10().load(tmp_path, "train")


@pytest.mark.parametrize("content", [b"not a zip file", b"PK\x03\x04 truncated"])
def test_corrupt_file_is_reported(tmp_path, content: bytes) -> None:
    path = tmp_path / "cifar10" / "train.npz"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid prepared dataset file.*Delete it"):
        CIFAR10().load(tmp_path, "train")


def test_wrong_shape_or_labels_are_reported(tmp_path) -> None:
    write_npz(tmp_path / "cifar10" / "train.npz", np.zeros((2, 28, 28, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32, 3\)"):
        CIFAR10().load(tmp_path, "train")
    write_npz(tmp_path / "cifar10" / "test.npz", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 12]))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        CIFAR10().load(tmp_path, "test")


def test_real_cifar10(shared_data) -> None:
    x, y = CIFAR10().load(shared_data, "train")
    xt, yt = CIFAR10().load(shared_data, "test")
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [5000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    mean = (x[:5000].float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(CIFAR10.spec.mean), atol=0.01)


def _ppm(path, size, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path, format="PPM")


def test_gtsrb_official_layout(tmp_path) -> None:
    root = tmp_path / "gtsrb" / "raw" / "gtsrb"
    for cls in (0, 5, 42):  # classes are read from folder names, not their order
        _ppm(root / "GTSRB" / "Training" / f"{cls:05d}" / f"00000_0000{cls % 10}.ppm", (40, 35), cls)
    rows = [("00000.ppm", 7), ("00001.ppm", 42)]
    for name, cls in rows:
        _ppm(root / "GTSRB" / "Final_Test" / "Images" / name, (50, 60), cls)
    with open(root / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for name, cls in rows:
            w.writerow([name, 50, 60, 5, 5, 45, 55, cls])
    GTSRB().prepare(tmp_path, download=False)
    x, y = GTSRB().load(tmp_path, "train")
    xt, yt = GTSRB().load(tmp_path, "test")
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 5, 42]
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == [7, 42]
    assert (x[1] == 5).all() and (xt[1] == 42).all(), "pixels survive the resize"


def test_gtsrb_missing_offline(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="GTSRB train files not found"):
        GTSRB().prepare(tmp_path, download=False)


def test_tiny_imagenet_official_layout(tmp_path) -> None:
    root = tmp_path / "tiny_imagenet" / "raw" / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # labels follow the sorted order: n01 -> 0, n02 -> 1, n03 -> 2
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        path = root / "train" / w / "images" / f"{w}_0.JPEG"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((64, 64), 50 * i, dtype=np.uint8), mode="L").save(path)  # greyscale
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k, w in enumerate(["n03", "n01"]):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    TinyImageNet().prepare(tmp_path, download=False)
    x, y = TinyImageNet().load(tmp_path, "train")
    xt, yt = TinyImageNet().load(tmp_path, "test")
    assert x.shape == (3, 3, 64, 64) and sorted(y.tolist()) == [0, 1, 2]
    assert xt.shape == (2, 3, 64, 64) and yt.tolist() == [2, 0]
