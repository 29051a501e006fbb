"""Trigger resource files: the registry matches BackdoorBench's files, checksums are enforced, a missing file
offline says where to put it, downloads are atomic and checked, and `prepare triggers` fills a data folder.

No test touches the network: downloads go through a `file://` URL or a patched `urlopen`."""

from __future__ import annotations

import hashlib
import io
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from datamodules import prepare, resources
from datamodules.resources import RESOURCES, Resource
from tests.helpers import block_downloads

SURVEY_DATASETS = ("cifar10", "gtsrb", "tiny")
SURVEY_MODELS = ("preactresnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large")


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    block_downloads(monkeypatch)


def mirror(monkeypatch, folder: Path) -> None:
    """Serve downloads from `folder` (laid out like BackdoorBench's resource/) through file:// URLs."""
    monkeypatch.setattr(resources, "urlopen", urllib.request.urlopen)
    monkeypatch.setattr(resources, "BASE_URL", folder.resolve().as_uri() + "/")


def fake_resource(monkeypatch, tmp_path: Path, content: bytes, sha256: str | None = None) -> Resource:
    """A registered resource `test_file` whose upstream copy lives in tmp_path/upstream/test/file.bin."""
    source = tmp_path / "upstream" / "test" / "file.bin"
    source.parent.mkdir(parents=True)
    source.write_bytes(content)
    res = Resource("test_file", "test/file.bin", sha256 or hashlib.sha256(content).hexdigest(), "a test file")
    monkeypatch.setitem(RESOURCES, res.name, res)
    mirror(monkeypatch, tmp_path / "upstream")
    return res


def test_registry_matches_the_shared_files(shared_data) -> None:
    """Every registered file is in ../shared/data with its sha256, and every file the README lists is registered."""
    listed = re.findall(r"^\s+([0-9a-f]{64})\s+(\S+)$", (shared_data / "triggers" / "README.md").read_text(), re.M)
    assert len(listed) == 35
    assert {(r.sha256, r.upstream) for r in RESOURCES.values()} == set(listed)
    for name, res in RESOURCES.items():
        path, how = resources.ensure(name, shared_data, download_missing=False)
        assert path == shared_data / "triggers" / res.upstream and how == "present"
        assert res.url == ("https://raw.githubusercontent.com/SCLBD/BackdoorBench/"
                           f"f02e3534645f0ee63d6848653062cd6c0d6c400d/resource/{res.upstream}")


def test_the_survey_files_are_registered() -> None:
    assert RESOURCES["hello_kitty"].relative_path == "triggers/blended/hello_kitty.jpeg"
    assert RESOURCES["badnet_trigger"].relative_path == "triggers/badnet/trigger_image.png"
    for dataset in SURVEY_DATASETS:
        for model in SURVEY_MODELS:
            res = RESOURCES[f"lf_{dataset}_{model}"]
            assert res.relative_path == f"triggers/lowFrequency/{dataset}_{model}_0_255.npy"


def test_a_corrupted_copy_is_refused(tmp_path) -> None:
    res = RESOURCES["hello_kitty"]
    target = tmp_path / "triggers" / "blended" / "hello_kitty.jpeg"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the picture")
    found = hashlib.sha256(b"not the picture").hexdigest()
    with pytest.raises(ValueError) as err:
        resources.resolve("hello_kitty", tmp_path)
    message = str(err.value)
    for part in (str(target), f"sha256 {found}", f"expected {res.sha256}", "Delete it and fetch it again"):
        assert part in message, (part, message)
    assert target.read_bytes() == b"not the picture", "a wrong file is reported, never silently replaced"


@pytest.mark.parametrize("download", [False, True])
def test_missing_offline_says_what_to_put_where(tmp_path, download: bool) -> None:
    """Offline (downloading disabled, or the download failing) the error names the exact target path, the URL,
    BackdoorBench's path and the sha256; the folder is left without a partial file."""
    res = RESOURCES["lf_cifar10_preactresnet18"]
    target = (tmp_path / "triggers" / "lowFrequency" / "cifar10_preactresnet18_0_255.npy").absolute()
    with pytest.raises(FileNotFoundError) as err:
        resources.resolve(res.name, tmp_path, download_missing=download)
    message = str(err.value)
    upstream = "BackdoorBench's resource/lowFrequency/cifar10_preactresnet18_0_255.npy"
    for part in (f"Put the file at {target}:", res.url, upstream, resources.BACKDOORBENCH_COMMIT,
                 f"sha256 {res.sha256}"):
        assert part in message, (part, message)
    assert ("downloads are disabled in tests" in message) == download, "the download's own error is kept"
    assert not target.exists()
    assert not target.parent.exists() or not list(target.parent.iterdir()), "no temp file left behind"


def test_download_from_a_file_url_is_checked_and_atomic(tmp_path, monkeypatch) -> None:
    content = bytes(range(256)) * 600  # > one read chunk
    res = fake_resource(monkeypatch, tmp_path, content)
    renames = []
    real_replace = resources.os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst), Path(src).read_bytes() == content))
        real_replace(src, dst)

    monkeypatch.setattr(resources.os, "replace", spy)
    data_dir = tmp_path / "data"
    path, how = resources.ensure(res.name, data_dir)
    assert (path, how) == (data_dir.absolute() / "triggers" / "test" / "file.bin", "downloaded")
    assert path.read_bytes() == content
    (src, dst, complete), = renames
    assert dst == path and src.parent == path.parent and src != path and complete, \
        "written whole to a temp file in the same folder, then renamed into place"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]
    assert resources.ensure(res.name, data_dir) == (path, "present"), "fetched once"


def test_a_download_with_the_wrong_checksum_is_not_kept(tmp_path, monkeypatch) -> None:
    res = fake_resource(monkeypatch, tmp_path, b"what the server sends", sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match=f"has sha256 {hashlib.sha256(b'what the server sends').hexdigest()}"
                       f", expected {'0' * 64}"):
        resources.resolve(res.name, tmp_path / "data")
    folder = tmp_path / "data" / "triggers" / "test"
    assert list(folder.iterdir()) == [], "neither the file nor a temp file is left"


def test_a_broken_download_leaves_no_file(tmp_path, monkeypatch) -> None:
    """A connection that dies halfway leaves nothing at the target (the next run downloads again)."""
    res = fake_resource(monkeypatch, tmp_path, b"x" * 100_000)

    class Dies(io.BytesIO):
        def read(self, n=-1):
            if self.tell() >= 65_536:
                raise ConnectionResetError("connection reset")
            return super().read(n)

    monkeypatch.setattr(resources, "urlopen", lambda url, timeout=None: Dies(b"x" * 100_000))
    with pytest.raises(FileNotFoundError, match="ConnectionResetError"):
        resources.resolve(res.name, tmp_path / "data")
    assert list((tmp_path / "data" / "triggers" / "test").iterdir()) == []


def test_prepare_triggers_fills_a_data_folder(tmp_path, monkeypatch, capsys, shared_data) -> None:
    """`python -m datamodules.prepare triggers` with downloads served from ../shared/data/triggers."""
    mirror(monkeypatch, shared_data / "triggers")
    data_dir = tmp_path / "data"
    prepare.main(["triggers", "--data_dir", str(data_dir)])
    out = capsys.readouterr().out
    for name, res in RESOURCES.items():
        target = data_dir.absolute() / res.relative_path
        assert target.read_bytes() == (shared_data / res.relative_path).read_bytes()
        assert f"{name}: {target} (downloaded" in out
    block_downloads(monkeypatch)
    prepare.main(["triggers", "--data_dir", str(data_dir), "--no-download"])  # now only checked
    assert capsys.readouterr().out.count("(present, sha256 ok)") == len(RESOURCES)


def test_prepare_triggers_offline_fails_with_the_list(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        prepare.main(["triggers", "--data_dir", str(tmp_path)])
    message = str(err.value.code)
    assert message.startswith(f"{len(RESOURCES)} of {len(RESOURCES)} trigger resources are missing")
    assert str(tmp_path.absolute() / "triggers" / "blended" / "hello_kitty.jpeg") in message
    prepare.main(["digits", "--data_dir", str(tmp_path)])  # datasets still work
    assert "digits is built in" in capsys.readouterr().out
