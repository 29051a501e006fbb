""""before" is measured once per attacked model and reused by every later run on it (evaluation.py): only when the
weights, the test sets and the measurement settings are the same; a damaged or unwritable cache costs a measurement,
never a run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lightning_modules.defenses.evaluation import CACHE_ENV


@pytest.fixture
def model(backdoored_checkpoint, tmp_path):
    """A private copy of the session's attacked checkpoint, so that its cache starts empty."""
    path = tmp_path / "attack" / "last.ckpt"
    path.parent.mkdir()
    shutil.copy(backdoored_checkpoint["path"], path)
    return path


def entries(model) -> list:
    return sorted((model.parent / "last.before").glob("*.json"))


def test_second_run_on_a_model_reads_the_first_runs_numbers(model, run_defense, monkeypatch) -> None:
    first = run_defense("ft", model, epochs=0)
    second = run_defense("bnp", model, epochs=0, data={"split_seed": 1, "spc": 2})  # another defense, D_m, SPC
    assert (first.result["before_source"], second.result["before_source"]) == ("measured", "cache")
    assert second.result["before"] == first.result["before"] and len(entries(model)) == 1
    monkeypatch.setenv(CACHE_ENV, "off")  # the cached numbers are what a measurement gives
    fresh = run_defense("ft", model, epochs=0)
    assert fresh.result["before_source"] == "measured" and fresh.result["before"] == first.result["before"]


def test_changed_weights_or_test_sets_are_measured_again(model, run_defense) -> None:
    run_defense("ft", model, epochs=0)
    fewer = run_defense("ft", model, epochs=0, data={"n_test": 16})  # other test sets
    assert fewer.result["before_source"] == "measured"
    ckpt = torch.load(model, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.dim() == 4)
    ckpt["state_dict"][name] = -ckpt["state_dict"][name]  # the attack run wrote a new model at the same path
    torch.save(ckpt, model)
    changed = run_defense("ft", model, epochs=0)
    assert changed.result["before_source"] == "measured" and len(entries(model)) == 3
    assert changed.result["before"] != fewer.result["before"]


def test_a_damaged_entry_is_measured_and_replaced(model, run_defense) -> None:
    first = run_defense("ft", model, epochs=0)
    [entry] = entries(model)
    entry.write_text('{"key": ')  # a truncated file (a disk filled up mid-write elsewhere)
    again = run_defense("ft", model, epochs=0)
    assert again.result["before_source"] == "measured" and again.result["before"] == first.result["before"]
    assert json.loads(entry.read_text())["before"] == first.result["before"]


def test_an_unwritable_cache_folder_costs_a_measurement_not_the_run(model, run_defense) -> None:
    (model.parent / "last.before").write_text("a file where the folder would go")
    with pytest.warns(UserWarning, match="could not cache the 'before' measurement"):
        first = run_defense("ft", model, epochs=0)
    with pytest.warns(UserWarning, match="could not cache"):
        second = run_defense("ft", model, epochs=0)
    assert first.result["before_source"] == second.result["before_source"] == "measured"
    assert json.loads(first.result_path().read_text())["before_source"] == "measured"


def test_a_nonsense_cache_setting_is_refused(model, run_defense, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "of")
    with pytest.raises(ValueError, match="BACKDOOR_BENCH_BEFORE_CACHE='of': set it to on or off"):
        run_defense("ft", model, epochs=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("epochs", [0, 1], ids=["data-free", "trained"])
def test_before_and_after_are_measured_on_the_runs_device(model, run_defense, monkeypatch, epochs) -> None:
    """Lightning's teardown moves the module to the CPU before on_fit_end: "after" must still run on the GPU."""
    from lightning_modules.defenses.base import Defense

    devices, measure = [], Defense.measure
    monkeypatch.setattr(Defense, "measure", lambda self: devices.append(self.device.type) or measure(self))
    monkeypatch.setenv(CACHE_ENV, "off")
    run_defense("ft", model, epochs=epochs, trainer={"accelerator": "gpu", "devices": 1})
    assert devices == ["cuda", "cuda"]
