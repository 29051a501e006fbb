"""The on-disk cache of poisoned tensors: stable keys, atomic entries, rebuild on corruption."""

from __future__ import annotations

import pytest
import torch

from datamodules.cache import cached, fingerprint


def test_fingerprint_is_stable_and_sensitive() -> None:
    key = {"a": torch.arange(5), "b": [1.5, "x"], "s": torch.tensor(3.0), "e": torch.zeros(0)}
    assert fingerprint(key) == fingerprint({"b": [1.5, "x"], "a": torch.arange(5), "s": torch.tensor(3.0),
                                            "e": torch.zeros(0)})
    assert fingerprint(key) != fingerprint({**key, "s": torch.tensor(3.5)})
    assert fingerprint(torch.arange(4)) != fingerprint(torch.arange(4).float())


def test_cached_builds_once(tmp_path) -> None:
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}

    assert torch.equal(cached(tmp_path, "k", build)["x"], torch.arange(3))
    assert torch.equal(cached(tmp_path, "k", build)["x"], torch.arange(3))
    assert len(calls) == 1
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        cached(tmp_path, "k", build)
    assert len(calls) == 2
    assert cached(None, "k", build) and len(calls) == 3
