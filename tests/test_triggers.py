"""Every registered trigger: shape, dtype, range, exact pixels, determinism, record round trip."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.cache import fingerprint
from datamodules.triggers import SIG, TRIGGERS, BadNets, Blended, apply_badnets, apply_blended, build_trigger
from tests.helpers import block_downloads, lf_pattern_file


# How to build a small valid instance of each registered trigger (default construction where that works).
# A trigger that needs a file, a pattern or trained weights gets its entry here (keyed by its file name).
EXAMPLES: dict[str, object] = {
    "lf": lambda: TRIGGERS["lf"](pattern=lf_pattern_file()),  # a smooth 0..51 uint8 .npy
    "lira": lambda: TRIGGERS["lira"](eps=0.5),  # at eps 0.01 an untrained generator changes no pixel
    "iab": lambda: TRIGGERS["iab"](width=8),  # untrained, seeded; width 32 is only slower on CPU
    "ssba": lambda: TRIGGERS["ssba"](epochs=0, width=4),  # the seeded untrained encoder: no data, no training
}


def example(name: str):
    factory = EXAMPLES.get(name, TRIGGERS[name])
    return factory()


def images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
@pytest.mark.parametrize("size", [32, 64])
def test_shape_dtype_range_and_determinism(name: str, size: int) -> None:
    trigger = example(name)
    x = images(size=size)
    out = trigger(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x), "a trigger must change the images"
    assert torch.equal(example(name)(x), out), "same parameters, same output"
    assert torch.equal(x, images(size=size)), "the input must not be modified in place"


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_record_round_trip(name: str) -> None:
    trigger = example(name)
    x = images()
    rebuilt = build_trigger(trigger.record())
    assert type(rebuilt) is type(trigger)
    assert torch.equal(rebuilt(x), trigger(x))


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_rejects_non_uint8(name: str) -> None:
    with pytest.raises(TypeError, match="uint8"):
        example(name)(images().float())


def test_badnets_patch_pixels() -> None:
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    out = BadNets()(x)
    assert (out[:, :, 29:32, 29:32] == 255).all()
    out[:, :, 29:32, 29:32] = 0
    assert (out == 0).all(), "only rows/cols 29..31 change"


def test_badnets_scales_and_moves() -> None:
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    assert int((BadNets()(x) == 255).sum()) == 3 * 6 * 6  # 3 px per 32 px of side
    out = BadNets(patch_size=2, value=100, top=0, left=5)(images(1))
    assert (out[:, :, 0:2, 5:7] == 100).all()
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(patch_size=4, top=30)(images(1))


def test_badnets_picture_equals_reference_patch(shared_data) -> None:
    """BackdoorBench's trigger_image.png (3x3 white, bottom-right) gives exactly the default patch."""
    x = images()
    picture = BadNets(image=str(shared_data / "triggers" / "badnet" / "trigger_image.png"))
    assert torch.equal(picture(x), BadNets()(x))


def test_badnets_picture_travels_in_the_record(tmp_path) -> None:
    """A trigger picture is resized bilinearly (the reference's 64 px ramp) and resolved by `fit`, so the record
    holds its pixels: the run rebuilds without the file."""
    picture = np.zeros((32, 32, 3), dtype=np.uint8)
    picture[29:, 29:] = 255
    path = tmp_path / "patch.png"
    Image.fromarray(picture).save(path)
    trigger = BadNets(image=str(path))
    x64 = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    trigger.fit(x64, torch.zeros(2))
    record = trigger.record()
    path.unlink()
    rebuilt = build_trigger(record)
    out = rebuilt(x64)
    assert torch.equal(out, trigger(x64))
    assert (out[:, :, 59:, 59:] == 255).all(), "the 5x5 white core at 64 px"
    changed = (out[0] != 0).any(0)
    assert changed[57:, 57:].all() and changed.sum() == 49, "plus the 2 px grey ramp: 7x7 pixels replaced"


def test_blended_fit_records_the_picture(tmp_path) -> None:
    """Poisoned sets may come from the cache (no trigger call): `fit` alone must put the picture in the record."""
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    trigger = Blended(image=str(path))
    trigger.fit(images(1), torch.zeros(1))
    assert list(trigger.record()["state"]["_extra_state"]) == ["3x32x32"]


def test_apply_badnets_is_where() -> None:
    x = images(2)
    pattern = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 3, 4] = True
    out = apply_badnets(x, pattern, mask)
    assert (out[:, :, 3, 4] == 7).all() and torch.equal(out[:, :, 5:], x[:, :, 5:])


def test_blended_equals_formula() -> None:
    x = images()
    trigger = Blended(alpha=0.2, seed=3)
    pattern = trigger.pattern((3, 32, 32))
    expected = np.clip(np.rint(0.8 * x.numpy().astype(np.float64) + 0.2 * pattern.numpy()), 0, 255)
    assert np.abs(trigger(x).numpy().astype(int) - expected.astype(int)).max() == 0
    assert not torch.equal(Blended(seed=4).pattern((3, 32, 32)), pattern), "the seed picks the noise"


def test_blended_picture(tmp_path) -> None:
    picture = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "t.png"
    Image.fromarray(picture).save(path)
    trigger = Blended(alpha=0.5, image=str(path))
    resized = np.asarray(Image.fromarray(picture).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(trigger.pattern((3, 32, 32)), torch.from_numpy(resized.copy()))
    x = images()
    assert torch.equal(trigger(x), apply_blended(x, torch.from_numpy(resized.copy()), 0.5))
    # the resolved picture travels in the state: the file may disappear afterwards
    record = trigger.record()
    path.unlink()
    assert torch.equal(build_trigger(record)(x), trigger(x))


def test_blended_hello_kitty_resource(shared_data, tmp_path, monkeypatch) -> None:
    """`image: hello_kitty` is BackdoorBench's picture found in the run's data folder: the same images as the
    explicit file; rebuilt from its record it needs no file; the record does not depend on the folder."""
    block_downloads(monkeypatch)
    x = images()
    named = Blended(image="hello_kitty")
    named.bind_run("cifar10", 0, str(shared_data), None)
    named.fit(x, torch.zeros(len(x)))
    picture = shared_data / "triggers" / "blended" / "hello_kitty.jpeg"
    assert torch.equal(named(x), Blended(image=str(picture))(x))
    assert not torch.equal(named(x), Blended()(x)), "not the noise default"
    record = named.record()
    rebuilt = build_trigger(record)
    rebuilt.bind_run("cifar10", 0, str(tmp_path / "elsewhere"), None)  # no file there, and no network
    assert torch.equal(rebuilt(x), named(x))
    copy = tmp_path / "data" / "triggers" / "blended" / "hello_kitty.jpeg"
    copy.parent.mkdir(parents=True)
    shutil.copy(picture, copy)
    other = Blended(image="hello_kitty")
    other.bind_run("cifar10", 0, str(tmp_path / "data"), None)
    other.fit(x, torch.zeros(len(x)))
    assert fingerprint(other.record()) == fingerprint(record), "the cache key does not depend on the folder"
    monkeypatch.chdir(tmp_path)
    assert torch.equal(Blended(image="hello_kitty")(x), named(x)), "without bind_run: looked up in ./data"
    with pytest.raises(FileNotFoundError, match="'hello-kitty' is neither a file nor a registered resource"):
        Blended(image="hello-kitty")(x)


def test_badnets_trigger_resource(shared_data, tmp_path, monkeypatch) -> None:
    """`image: badnet_trigger` at 32 px is exactly the default 3x3 square; at 64 px it is the reference's resized
    picture (not our scaled 6x6 square); rebuilt from its record it needs no file."""
    block_downloads(monkeypatch)
    x32, x64 = images(), images(size=64)
    named = BadNets(image="badnet_trigger")
    named.bind_run("tiny_imagenet", 0, str(shared_data), None)
    assert torch.equal(named(x32), BadNets()(x32))
    explicit = BadNets(image=str(shared_data / "triggers" / "badnet" / "trigger_image.png"))
    assert torch.equal(named(x64), explicit(x64))
    assert not torch.equal(named(x64), BadNets()(x64))
    rebuilt = build_trigger(named.record())
    rebuilt.bind_run("tiny_imagenet", 0, str(tmp_path), None)  # no file there, and no network
    assert torch.equal(rebuilt(x64), named(x64)) and torch.equal(rebuilt(x32), named(x32))


def test_sig_equals_formula() -> None:
    x = images()
    out = SIG(delta=40, frequency=6)(x).numpy().astype(int)
    j = np.arange(32)
    v = 40 * np.sin(2 * math.pi * j * 6 / 32)
    expected = np.clip(np.rint(x.numpy().astype(np.float64) + v[None, None, None, :]), 0, 255)
    assert np.abs(out - expected).max() <= 1e-9
    assert SIG.clean_label


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=1.5)
    with pytest.raises(ValueError, match="0..255"):
        BadNets(value=300)
    with pytest.raises(ValueError, match="patch_size"):
        BadNets(patch_size=0)
    with pytest.raises(ValueError, match="unknown trigger class"):
        build_trigger({"class_path": "datamodules.triggers.NoSuch", "init_args": {}})
    with pytest.raises(ValueError, match="not a Trigger"):
        build_trigger({"class_path": "torch.nn.Linear", "init_args": {}})


class _Recording(BadNets):
    """BadNets that remembers what `fit` was given (defined here, not registered)."""

    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor) -> None:
        self.calls = [*getattr(self, "calls", []), (x_train.shape, y_train.shape)]


def test_datamodule_fits_the_trigger_on_clean_training_data(tmp_path) -> None:
    from datamodules import BackdoorDataModule
    from datamodules.datasets import Digits

    x, y = Digits().build("train")
    trigger = _Recording()
    data = BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=trigger, cache_dir=None)
    data.setup("fit")
    assert trigger.calls == [((len(x), 3, 32, 32), (len(y),))], "once, with the whole clean training set"
    rebuilt = build_trigger(trigger.record())
    assert rebuilt.from_record and not trigger.from_record
    BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=rebuilt, cache_dir=None).setup("fit")
    assert not hasattr(rebuilt, "calls"), "a trigger restored from a record is not fitted again"
    BadNets().fit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1))  # the base hook: a no-op


def test_ssba_encoder_trains_through_the_hook(tmp_path, monkeypatch) -> None:
    """No dataset= needed: the DataModule hands SSBA the run's clean training images."""
    import datamodules.triggers.ssba as ssba_module
    from datamodules import BackdoorDataModule
    from datamodules.ssba_encoder import StegaStampDecoder, StegaStampEncoder

    seen = {}

    def fake_training(images, settings, cache_dir, name):
        seen["shape"], seen["name"] = tuple(images.shape), name
        report = {"seconds": 12.5, "steps": 3.0, "bit_accuracy": 0.75, "psnr_db": 31.0}
        return StegaStampEncoder(settings["bits"], settings["width"]), StegaStampDecoder(settings["bits"], 4), report

    monkeypatch.setattr(ssba_module, "cached_stegastamp", fake_training)
    trigger = TRIGGERS["ssba"](epochs=1, width=4)
    data = BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=trigger, cache_dir=None)
    data.setup("fit")
    assert seen["shape"][1:] == (3, 32, 32) and seen["shape"][0] > 1000 and int(trigger.image_size) == 32
    # the encoder's cost, bit accuracy and PSNR travel in the backdoor record
    assert data.attack_record()["trigger_report"] == {"seconds": 12.5, "steps": 3.0, "bit_accuracy": 0.75,
                                                      "psnr_db": 31.0}
