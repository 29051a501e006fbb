"""The cache that measures a defense run's "before" once per attacked model.

"before" depends on the attacked weights and the test sets only: every defense run on one attacked model (16
defenses x 3 SPC x 10 split seeds in the survey) measures the same numbers before its method touches the weights.
The first run measures them and stores them beside the attacked checkpoint, in `<dir>/<stem>.before/<key>.json`;
later runs read them (`before_source: cache` in result.json). The key is a digest of everything the numbers
depend on: the network's weights as the run is about to measure them (a changed checkpoint, or weights a caller
changed, are measured anew), the test tensors, the precision, the device type, the memory format, the evaluation
batch size, the torch version and EVAL_VERSION (raise it when the measurement changes).
Writes are atomic, so runners racing on one model (several workers, several machines sharing the runs folder)
each see a whole entry or none, and write the same numbers. A folder that cannot be written is not an error: the
run measures and goes on. BACKDOOR_BENCH_BEFORE_CACHE=off measures every run.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from datamodules.cache import fingerprint
from datamodules.record import write_json

EVAL_VERSION = 1
CACHE_ENV = "BACKDOOR_BENCH_BEFORE_CACHE"


class BeforeCache:
    """The cached "before" numbers of one attacked checkpoint under one measurement key (a dict of what they
    depend on, tensors included: `fingerprint` digests it). `kind` names another measurement cached the same way
    (`retuned`: the retuning attack's reference rows, retuning.py), in `<stem>.<kind>/`."""

    def __init__(self, checkpoint: str | Path, key: dict[str, Any], kind: str = "before") -> None:
        checkpoint = Path(checkpoint)
        self.digest, self.kind = fingerprint(key), kind
        self.path = checkpoint.parent / f"{checkpoint.stem}.{kind}" / f"{self.digest}.json"
        setting = os.environ.get(CACHE_ENV, "on").lower()
        if setting not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{CACHE_ENV}={os.environ[CACHE_ENV]!r}: set it to on or off (off measures 'before' in "
                             f"every run)")
        self.enabled = setting in ("on", "1", "true", "yes")

    def read(self) -> dict[str, Any] | None:
        """The cached scores, or None (no entry, or an unreadable one: it is measured again and replaced)."""
        if not self.enabled or not self.path.is_file():
            return None
        try:
            entry = json.loads(self.path.read_text())[self.kind]  # the file's name is the key's digest
            return scores(entry) if self.kind == "before" else {k: None if v is None else scores(v)
                                                                 for k, v in entry.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self, value: dict[str, Any], seconds: float) -> None:
        if not self.enabled:
            return
        try:
            write_json(self.path, {self.kind: value, "seconds": seconds, "eval_version": EVAL_VERSION})
        except OSError as err:
            warnings.warn(f"could not cache the '{self.kind}' measurement in {self.path} ({err}); every run on this "
                          f"model measures it again", stacklevel=2)


def scores(entry: dict[str, Any]) -> dict[str, float]:
    """ACC / ASR / RA (the retuned rows: rta_acc, rta_asr, rta_ra) of a cache entry, as floats."""
    keys = ("acc", "asr", "ra") if "acc" in entry else ("rta_acc", "rta_asr", "rta_ra")
    return {k: float(entry[k]) for k in keys}
