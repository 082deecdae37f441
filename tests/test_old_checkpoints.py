"""Checkpoints written by an older msnet (commit 1494bd9, before methods/ and the ground floor moved) still
evaluate and resume, with the numbers that older code gives.

The fixtures are tiny runs (synthetic 8x8 data, 4 channels, 4 layers, 2 epochs; adam, trainer=mgopt
trainer.levels=2, trainer=rmtr trainer.levels=2, optimizer=bcd) written by 1494bd9's trainer. The expected
values were measured by 1494bd9's own code on these files: ``msnet evaluate ckpt=FILE splits=[test]``, and
``msnet train resume=FILE trainer.epochs=3`` followed by a SHA-256 over the resumed run's final weights
(sorted state-dict keys and raw bytes; the first 16 hex digits). The adam and MG/OPT runs were cosine
schedules over 2 epochs, so their third epoch trains at lr 0 and leaves the weights where they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from msnet.tasks.evaluate import evaluate_checkpoint
from msnet.training import train

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = {  # measured by 1494bd9 (module docstring)
    "adam": (0.8, 0.5948676681518554, "eddae134d1355f99"),
    "mgopt": (0.945, 0.17274582386016846, "4411d80a99a09ac0"),
    "rmtr": (0.955, 0.11082756519317627, "4b566131dd7b65de"),
    "bcd": (0.97, 0.098983633518219, "e8a7ace935bbae90"),
}


def weights_hash(path: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(torch.load(path, weights_only=True)["model"].items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_checkpoint_evaluates_and_resumes_as_it_did(name, compose_cfg, tmp_path):
    ckpt = FIXTURES / f"ckpt_1494bd9_{name}.pt"
    acc, loss, resumed = EXPECTED[name]
    records = evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={ckpt}", "device=cpu", "splits=[test]"]))
    assert records[0]["acc"] == acc and records[0]["loss"] == pytest.approx(loss, rel=1e-12)
    overrides = ["trainer.epochs=3", "device=cpu", "threads=1", "trainer.progress=false"]
    summary = train(compose_cfg("train", [f"resume={ckpt}", *overrides]), tmp_path / "run", overrides=overrides)
    assert summary["status"] == "completed" and summary["epochs"] == 3
    assert weights_hash(tmp_path / "run" / "checkpoints" / "last.pt") == resumed


def test_a_config_saved_before_keys_existed_is_read_on_todays_schema(compose_cfg, tmp_path):
    """A checkpoint whose config predates settings (batch growth, best.pt, patience, the time-smooth start, the
    step bound, stochastic depth) reads as if they had their defaults: upgraded once, where it is loaded."""
    from msnet.config import upgrade_config
    from msnet.runs.checkpoint import load_checkpoint

    ckpt = torch.load(FIXTURES / "ckpt_1494bd9_mgopt.pt", weights_only=True)
    for group, key in (("trainer", "batch_growth"), ("trainer", "batch_max"), ("trainer", "save_best"),
                       ("trainer", "patience"), ("trainer", "levels"), ("model", "init_knots"),
                       ("model", "step_bound"), ("model", "stochastic_depth")):
        del ckpt["config"][group][key]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    loaded = load_checkpoint(old)["config"]
    assert loaded == upgrade_config(ckpt["config"])
    assert loaded["trainer"]["levels"] == 2 and loaded["trainer"]["save_best"] is True  # MGOptConfig's defaults
    assert loaded["model"]["stochastic_depth"] == {"p_last": 1.0} and loaded["model"]["init_knots"] is None
    records = evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={old}", "device=cpu", "splits=[test]"]))
    assert records[0]["acc"] == EXPECTED["mgopt"][0]
    overrides = ["trainer.epochs=3", "device=cpu", "threads=1", "trainer.progress=false"]
    summary = train(compose_cfg("train", [f"resume={old}", *overrides]), tmp_path / "run", overrides=overrides)
    assert summary["epochs"] == 3 and weights_hash(tmp_path / "run" / "checkpoints" / "last.pt") == EXPECTED["mgopt"][2]
