"""LF: both BackdoorBench file formats on one scale, the generated pattern's properties, caching, the record,
and a short poisoning run on digits."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

import datamodules.lf_pattern as lf_pattern
from datamodules import BackdoorDataModule
from datamodules.lf_pattern import PatternGeneration, generate_pattern
from datamodules.triggers import LowFrequency, build_trigger
from datamodules.resources import RESOURCES
from datamodules.triggers.lf import apply_lf, read_pattern, reference_resource
from lightning_modules import VictimTraining
from lightning_modules.backbones import BACKBONES, SmallCNN, class_path
from tests.helpers import block_downloads, lf_blob, lf_pattern_file

# A tiny generation budget: the pattern's properties do not depend on the surrogate being good.
TINY = {"dataset": "digits", "surrogate": {"class_path": "lightning_modules.backbones.SmallCNN",
                                           "init_args": {"width": 8}},
        "surrogate_epochs": 2, "num_images": 20, "passes": 2, "max_iter": 30, "holdout_per_class": 2, "seed": 0,
        "target": 0}


def images(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_both_file_formats_load_on_the_0_255_scale(tmp_path) -> None:
    u = lf_blob()
    np.save(tmp_path / "u.npy", u)                                         # uint8 (H, W, 3) 0..51
    np.save(tmp_path / "f.npy", (u.astype(np.float32) / 255)[None])       # float32 (1, H, W, 3) 0..0.2
    a, b = read_pattern(str(tmp_path / "u.npy")), read_pattern(str(tmp_path / "f.npy"))
    assert a.shape == b.shape == (3, 32, 32) and a.max() == 51
    assert torch.allclose(a, b, atol=1e-4)
    x = images()
    assert torch.equal(LowFrequency(str(tmp_path / "u.npy"))(x), LowFrequency(str(tmp_path / "f.npy"))(x))


def test_reference_files(shared_data) -> None:
    """BackdoorBench's uint8 and float (VGG-19-BN) files: same scale; the float one is not a null trigger."""
    folder = shared_data / "triggers" / "lowFrequency"
    uint8_file, float_file = folder / "cifar10_preactresnet18_0_255.npy", folder / "cifar10_vgg19_bn_0_255.npy"
    assert np.load(float_file).dtype == np.float32 and np.load(float_file).max() <= 0.2 + 1e-6
    for path in (uint8_file, float_file):
        p = read_pattern(str(path))
        assert p.min() == 0 and abs(float(p.max()) - 51) < 1e-3
        assert low_frequency_share(p) > 0.98
    x = images()
    raw = np.load(float_file)[0].transpose(2, 0, 1)
    reference = np.clip(x.numpy() + raw, 0, 255).astype(np.uint8)  # what BackdoorBench does with this file
    assert np.array_equal(reference, x.numpy()), "the reference's float file is a null trigger"
    out = LowFrequency(str(float_file))(x)
    assert (out.int() - x.int()).abs().max() >= 40, "read on the 0..1 scale, it is a real trigger"


def backbone(name: str) -> dict:
    return {"class_path": class_path(BACKBONES[name]), "init_args": {}}


def test_reference_names_every_survey_file() -> None:
    """Our dataset and backbone class names map onto BackdoorBench's file names."""
    for dataset, theirs in (("cifar10", "cifar10"), ("gtsrb", "gtsrb"), ("tiny_imagenet", "tiny")):
        for ours, model in (("preact_resnet18", "preactresnet18"), ("vgg19_bn", "vgg19_bn"),
                            ("efficientnet_b3", "efficientnet_b3"), ("mobilenet_v3_large", "mobilenet_v3_large")):
            name = reference_resource(dataset, backbone(ours))
            assert RESOURCES[name].relative_path == f"triggers/lowFrequency/{theirs}_{model}_0_255.npy"


def test_reference_pattern_is_the_runs_file(shared_data, tmp_path, monkeypatch) -> None:
    """`pattern: reference` bound to cifar10 + PreActResNet18 is that file; rebuilt from its record it needs no
    file; VGG-19-BN's float file is read on the 0..1 scale (a real trigger, unlike the reference)."""
    block_downloads(monkeypatch)
    folder = shared_data / "triggers" / "lowFrequency"
    x = images()
    trigger = LowFrequency("reference")
    trigger.bind_run("cifar10", 0, str(shared_data), backbone("preact_resnet18"))
    trigger.fit(x, torch.zeros(len(x)))
    assert torch.equal(trigger(x), LowFrequency(str(folder / "cifar10_preactresnet18_0_255.npy"))(x))
    assert trigger.report() == {"reference": "triggers/lowFrequency/cifar10_preactresnet18_0_255.npy"}
    rebuilt = build_trigger(trigger.record())
    assert torch.equal(rebuilt(x), trigger(x)) and rebuilt.report() == trigger.report()
    rebuilt.bind_run("cifar10", 0, str(tmp_path), backbone("preact_resnet18"))  # the same file: no lookup
    assert torch.equal(rebuilt(x), trigger(x))
    vgg = LowFrequency("reference")
    vgg.bind_run("gtsrb", 0, str(shared_data), backbone("vgg19_bn"))
    assert torch.equal(vgg(x), LowFrequency(str(folder / "gtsrb_vgg19_bn_0_255.npy"))(x))
    assert (vgg(x).int() - x.int()).abs().max() >= 40
    named = LowFrequency("lf_tiny_mobilenet_v3_large")  # any registered LF resource by name
    named.bind_run("tiny_imagenet", 0, str(shared_data), None)
    assert torch.equal(named(images(size=64)), LowFrequency(str(folder / "tiny_mobilenet_v3_large_0_255.npy"))(
        images(size=64)))


def test_reference_without_a_file_is_a_clear_error() -> None:
    alternatives = "PreActResNet18, VGG19BN, EfficientNetB3, MobileNetV3Large.*`generate`.*`pattern: <file.npy>`"
    with pytest.raises(ValueError, match="no BackdoorBench file for backbone SmallCNN.*" + alternatives):
        LowFrequency("reference").bind_run("cifar10", 0, "data", backbone("small_cnn"))
    with pytest.raises(ValueError, match="for dataset 'digits'.*cifar10, gtsrb, tiny_imagenet x.*" + alternatives):
        LowFrequency("reference").bind_run("digits", 0, "data", backbone("preact_resnet18"))
    with pytest.raises(ValueError, match="reference is chosen per run.*bind_run"):
        LowFrequency("reference")(images())


def test_apply_formula_and_resize(tmp_path) -> None:
    np.save(tmp_path / "u.npy", lf_blob())
    trigger = LowFrequency(str(tmp_path / "u.npy"))
    x = images()
    expected = np.clip(x.numpy().astype(int) + lf_blob().transpose(2, 0, 1)[None].astype(int), 0, 255)
    assert np.array_equal(trigger(x).numpy(), expected)
    assert torch.equal(apply_lf(x, trigger.resolved()), trigger(x))
    big = trigger(images(size=64))
    assert big.shape == (6, 3, 64, 64), "another image size gets the pattern resized"


def test_scale_argument_and_bad_inputs(tmp_path) -> None:
    np.save(tmp_path / "u.npy", lf_blob())
    np.save(tmp_path / "f.npy", (lf_blob().astype(np.float32) / 255)[None])
    np.save(tmp_path / "zero.npy", np.zeros((32, 32, 3), np.float32))
    np.save(tmp_path / "binary.npy", np.eye(32, dtype=np.float32)[..., None].repeat(3, -1))
    np.save(tmp_path / "chw.npy", np.ones((3, 32, 32), np.uint8))
    assert read_pattern(str(tmp_path / "f.npy"), "0-255").max() <= 0.2 + 1e-6, "an explicit scale is obeyed"
    assert read_pattern(str(tmp_path / "binary.npy"), "0-1").max() == 255
    with pytest.raises(ValueError, match="exceeds 255"):
        read_pattern(str(tmp_path / "u.npy"), "0-1")
    with pytest.raises(ValueError, match="all zeros"):
        read_pattern(str(tmp_path / "zero.npy"))
    with pytest.raises(ValueError, match="set scale explicitly"):
        read_pattern(str(tmp_path / "binary.npy"))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        read_pattern(str(tmp_path / "chw.npy"))
    with pytest.raises(ValueError, match="not found"):
        LowFrequency(str(tmp_path / "missing.npy"))(images())
    with pytest.raises(ValueError, match="scale"):
        LowFrequency(str(tmp_path / "u.npy"), scale="0-100")
    with pytest.raises(ValueError, match="exactly one pattern source"):
        LowFrequency()
    with pytest.raises(ValueError, match="exactly one pattern source"):
        LowFrequency(str(tmp_path / "u.npy"), generate=TINY)
    with pytest.raises(ValueError, match="needs surrogate"):  # nothing to bind it to outside a run
        generate_pattern(PatternGeneration(dataset="digits", target=0), cache_dir=None)
    with pytest.raises(ValueError, match="passes"):
        PatternGeneration(**{**TINY, "passes": 0})
    with pytest.raises(ValueError, match="unknown LF generation settings"):
        LowFrequency(generate={**TINY, "epochs": 3})


def low_frequency_share(pattern: torch.Tensor, radius: int = 3) -> float:
    """Share of the pattern's (mean-removed) spectral energy at spatial frequencies <= radius (cycles per
    image). The reference files: 0.99 at radius 3; uniform noise: 0.05."""
    spectrum = torch.fft.fft2(pattern.float() - pattern.float().mean(dim=(-2, -1), keepdim=True)).abs().pow(2)
    k = torch.fft.fftfreq(pattern.shape[-1]) * pattern.shape[-1]
    low = (k.abs()[:, None] <= radius) & (k.abs()[None, :] <= radius)
    return float(spectrum[..., low].sum() / spectrum.sum())


def test_generated_pattern(tmp_path, monkeypatch) -> None:
    """Properties, determinism, the disk cache, and the trigger's record, from one tiny generation."""
    cfg = PatternGeneration(**TINY)
    out = generate_pattern(cfg, cache_dir=str(tmp_path))
    p = out["pattern"]
    assert p.dtype == torch.uint8 and p.shape == (3, 32, 32)
    assert p.min() == 0 and p.max() == round(0.2 * 255), "non-negative, min-max rescaled to [0, 0.2]"
    assert low_frequency_share(p) > 0.9 > 0.1 > low_frequency_share(torch.randint(0, 52, (3, 32, 32)))
    assert torch.equal(generate_pattern(cfg, cache_dir=None)["pattern"], p), "deterministic per seed"

    def fail(*args, **kwargs):
        raise AssertionError("the cached pattern must be loaded, not regenerated")

    monkeypatch.setattr(lf_pattern, "universal_pattern", fail)
    monkeypatch.setattr(lf_pattern, "train_surrogate", fail)
    assert torch.equal(generate_pattern(cfg, cache_dir=str(tmp_path))["pattern"], p), "second call loads"
    assert len(list((tmp_path / "lf_patterns").glob("*.pt"))) == 1

    monkeypatch.setenv("BACKDOOR_BENCH_CACHE", str(tmp_path))  # the trigger's default cache
    trigger = LowFrequency(generate=TINY)
    x = images()
    out = trigger(x)
    assert torch.equal(out, apply_lf(x, p.float())) and (out.int() - x.int()).min() >= 0, "the pattern only adds"
    record = trigger.record()
    assert record["init_args"]["generate"]["dataset"] == "digits"
    assert torch.equal(record["state"]["_extra_state"]["pattern"], p.float())
    monkeypatch.setattr("datamodules.triggers.lf.generate_pattern",
                        lambda *a, **k: pytest.fail("the record carries the pattern"))
    assert torch.equal(build_trigger(record)(x), out)


def test_surrogate_checkpoint(tmp_path, backbone_checkpoint, monkeypatch) -> None:
    """A clean checkpoint of this project serves as the surrogate; a backdoored one is refused."""
    backdoored = backbone_checkpoint("small_cnn", width=8)
    settings = {**TINY, "surrogate": None, "surrogate_checkpoint": str(backdoored), "passes": 1, "num_images": 8,
                "max_iter": 10}
    with pytest.raises(ValueError, match="backdoored model"):
        generate_pattern(PatternGeneration(**settings), cache_dir=None)
    ckpt = torch.load(backdoored, weights_only=True)
    ckpt["backdoor"]["attack"] = None
    clean = tmp_path / "clean.ckpt"
    torch.save(ckpt, clean)
    monkeypatch.setattr(lf_pattern, "train_surrogate", lambda *a, **k: pytest.fail("the checkpoint is the surrogate"))
    out = generate_pattern(PatternGeneration(**{**settings, "surrogate_checkpoint": str(clean)}), cache_dir=None)
    assert out["pattern"].dtype == torch.uint8 and out["pattern"].max() <= 51
    with pytest.raises(ValueError, match="not found"):
        generate_pattern(PatternGeneration(**{**settings, "surrogate_checkpoint": str(tmp_path / "no.ckpt")}))


@pytest.mark.slow  # 6 s; static poisoning learning is the session fixture's (BadNets)
def test_poisoning_learns_the_backdoor(tmp_path) -> None:
    """10% of digits poisoned with a 0..51 low-frequency blob: SmallCNN (width 16, batch 64) learns it in
    8 epochs: test ACC 0.953, ASR 1.000 (35 s on 2 CPU cores shared with other jobs; ~6 s expected idle)."""
    path = tmp_path / "blob.npy"
    np.save(path, lf_blob())
    L.seed_everything(0, verbose=False)
    data = BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=LowFrequency(str(path)), poison_ratio=0.1,
                              batch_size=64, cache_dir=None)
    model = VictimTraining(functools.partial(SmallCNN, width=16))
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    metrics = trainer.test(model, data, verbose=False)
    merged = {k: v for d in metrics for k, v in d.items()}
    assert merged["test/acc"] > 0.9 and merged["test/asr"] > 0.85, merged


def test_generation_settings_bound_to_the_run() -> None:
    """Left None, dataset, target, data folder and surrogate are the run's (the victim's architecture); an
    explicit dataset or target other than the run's is refused; an explicit surrogate is kept."""
    victim = {"class_path": "lightning_modules.backbones.SmallCNN", "init_args": {"width": 12}}
    open_settings = {k: v for k, v in TINY.items() if k not in ("dataset", "surrogate", "target")}
    trigger = LowFrequency(generate=open_settings)
    trigger.bind_run("digits", 2, "some/dir", victim)
    assert {k: trigger.generate[k] for k in ("dataset", "target", "data_dir", "surrogate")} == \
        {"dataset": "digits", "target": 2, "data_dir": "some/dir", "surrogate": victim}
    assert trigger.record()["init_args"]["generate"]["surrogate"] == victim, "the record holds what was used"
    with pytest.raises(ValueError, match="needs dataset, target, surrogate"):
        generate_pattern(PatternGeneration(**open_settings), cache_dir=None)

    explicit = LowFrequency(generate=TINY)
    explicit.bind_run("digits", 0, "data", victim)
    assert explicit.generate["surrogate"] == TINY["surrogate"]
    with pytest.raises(ValueError, match="dataset 'digits'.*'cifar10'.*generate.dataset cifar10"):
        LowFrequency(generate=TINY).bind_run("cifar10", 0, "data", victim)
    with pytest.raises(ValueError, match="target 0.*generate.target 3"):
        LowFrequency(generate=TINY).bind_run("digits", 3, "data", victim)
    LowFrequency(lf_pattern_file()).bind_run("cifar10", 3, "data", victim)  # a file: the user's choice


def test_datamodule_binds_the_victim_backbone(tmp_path, monkeypatch) -> None:
    """Through BackdoorDataModule under a Trainer, the surrogate is the victim backbone it was given."""
    import lightning as L

    from datamodules import BackdoorDataModule
    from lightning_modules import VictimTraining
    from lightning_modules.backbones import SmallCNN

    seen = {}

    def fake(cfg, cache_dir="default"):
        seen.update(dataset=cfg.dataset, target=cfg.target, surrogate=cfg.surrogate)
        return {"pattern": torch.zeros(3, 32, 32, dtype=torch.uint8) + 9}

    monkeypatch.setattr("datamodules.triggers.lf.generate_pattern", fake)
    trigger = LowFrequency(generate={k: v for k, v in TINY.items() if k not in ("dataset", "surrogate", "target")})
    model = VictimTraining(functools.partial(SmallCNN, width=4))
    data = BackdoorDataModule("digits", data_dir=str(tmp_path), trigger=trigger, poison_ratio=0.05, cache_dir=None,
                              victim_backbone=model.backbone_spec)  # what train.py links from model.init_args
    L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, data)
    assert seen == {"dataset": "digits", "target": 0,
                    "surrogate": {"class_path": "core.backbones.small_cnn.SmallCNN",
                                  "init_args": {"width": 4}}}
