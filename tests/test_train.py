"""Training: a real short run learns, resume equals an uninterrupted run, evaluate from the file alone."""

from __future__ import annotations

import json

import pytest
import torch

from msnet import MsnetError
from msnet.runs import load_checkpoint, read_metrics
from msnet.training import train
from msnet.tasks.evaluate import evaluate_checkpoint
from msnet.training.loop import NonFiniteLoss

from .conftest import assert_same_weights, needs_fashion, strip_times


@needs_fashion
def test_real_fashion_run_learns(fashion_cfg, tmp_path):
    summary = train(fashion_cfg(), tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["final_test_acc"] > 0.65  # chance is 0.10
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    for name in ("config.yaml", "command.txt", "metrics.jsonl", "summary.json", "console.txt", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).exists(), name
    assert "summary" in (tmp_path / "run" / "console.txt").read_text()


def test_run_directory_and_checkpoint_describe_themselves(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(), tmp_path / "run")
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["epoch"] == 2 and ck["depth"] == [2] and ck["resolution"] == [8, 8] and ck["level"] == "fine"
    assert ck["config"]["model"]["layers"] == 2 and ck["optimizer"] is not None and "data" in ck["rng"]
    assert len(ck["history"]) == 2
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_test_acc"] == summary["final_test_acc"]


def test_resume_equals_uninterrupted_run(tiny_cfg, tmp_path, cut_and_resume):
    full = train(tiny_cfg(["trainer.epochs=3"]), tmp_path / "full")
    cut, resumed = cut_and_resume(["trainer.epochs=3"], 3)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    assert cut["epoch"] == 2
    assert strip_times(read_metrics(tmp_path / "resumed")) == strip_times(read_metrics(tmp_path / "full"))
    assert resumed["final_test_acc"] == full["final_test_acc"]
    assert resumed["final_test_loss"] == pytest.approx(full["final_test_loss"], rel=1e-12)
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "resumed" / "checkpoints" / "last.pt")


def test_resume_extends_and_refuses_other_models(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "a")
    ck = tmp_path / "a" / "checkpoints" / "last.pt"
    with pytest.raises(MsnetError, match="already finished 2 epochs; add trainer.epochs=N"):
        train(tiny_cfg([f"resume={ck}"]), tmp_path / "b", overrides=[f"resume={ck}"])
    summary = train(tiny_cfg([f"resume={ck}", "trainer.epochs=3"]), tmp_path / "c", overrides=[f"resume={ck}", "trainer.epochs=3"])
    assert summary["epochs"] == 3 and [m["epoch"] for m in read_metrics(tmp_path / "c")] == [1, 2, 3]
    with pytest.raises(MsnetError, match="holds a different model") as err:
        train(tiny_cfg([f"resume={ck}", "model.layers=3"]), tmp_path / "d", overrides=[f"resume={ck}", "model.layers=3"])
    assert "stages" in str(err.value) and "\n" not in str(err.value)


def test_evaluate_rebuilds_from_the_file_alone(tiny_cfg, compose_cfg, tmp_path):
    summary = train(tiny_cfg(), tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    ev = compose_cfg("evaluate", [f"ckpt={ck}", "device=cpu"])
    records = evaluate_checkpoint(ev, tmp_path / "eval")
    by_split = {r["split"]: r for r in records}
    assert by_split["test"]["acc"] == summary["final_test_acc"]
    assert by_split["val"]["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)  # float32 sums
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["results"] == records
    sub = evaluate_checkpoint(compose_cfg("evaluate", [f"ckpt={ck}", "device=cpu", "dataset.test_subset=50"]))
    assert {r["split"]: r["n"] for r in sub}["test"] == 50


def test_evaluate_refuses_data_of_another_size(tiny_cfg, compose_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "run")
    ev = compose_cfg("evaluate", [f"ckpt={tmp_path / 'run'}", "device=cpu", "dataset.image_size=12"])
    with pytest.raises(MsnetError, match="expects 8x8 images, which no level of synthetic"):
        evaluate_checkpoint(ev)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path, fail_epoch):
    fail_epoch(2, NonFiniteLoss("the training loss became nan in epoch 2, batch 5"))
    with pytest.raises(MsnetError, match=r"epoch 2.*last good checkpoint is .*last.pt \(epoch 1\)") as err:
        train(tiny_cfg(), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_real_divergence_is_caught(tiny_cfg, tmp_path):
    with pytest.raises(MsnetError, match="non-finite|became (nan|inf)"):
        train(tiny_cfg(["optimizer=sgd", "optimizer.lr=1e12", "model.activation=identity", "trainer.log_every=1"]), tmp_path / "run")


def test_float64_training(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(["dtype=float64", "trainer.epochs=1"]), tmp_path / "run")
    assert summary["status"] == "completed"
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["model"]["opening.weight"].dtype == torch.float64
