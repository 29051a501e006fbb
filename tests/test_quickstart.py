"""End to end: the README's quickstart, shortened, trains a backdoored model on 2 CPU cores."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS, run_cli


@pytest.mark.slow  # ~20 s on 2 CPU cores; the fast suite trains the same recipe at width 16 (conftest.py)
def test_quickstart_reaches_high_asr(tmp_path) -> None:
    cli = run_cli("fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "10",
                  "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                  "--trainer.num_sanity_val_steps", "0", cwd=tmp_path)
    metrics = cli.trainer.callback_metrics
    assert metrics["test/asr"] > 0.9 and metrics["test/acc"] > 0.9, dict(metrics)
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()
    assert "test/asr" in (run / "metrics.csv").read_text()
