"""Checkpoints: atomic writes, weights_only loads, one-line errors for bad files."""

from __future__ import annotations

import os

import pytest
import torch

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.runs import load_checkpoint, save_checkpoint


def payload():
    spec = ModelSpec(1, 3, (8, 8), [StageSpec(2, 2, 1.0)])
    model = build_model(spec)
    return spec, model, {"model_spec": spec.to_dict(), "model": model.state_dict(), "config": {"seed": 0}, "epoch": 1,
                         "rng": {"torch": torch.get_rng_state()}}


def test_round_trip_rebuilds_the_model(tmp_path):
    spec, model, p = payload()
    path = save_checkpoint(tmp_path / "ck" / "last.pt", p)
    assert [f for f in os.listdir(path.parent)] == ["last.pt"]  # no temp file left behind
    ck = load_checkpoint(path)
    rebuilt = build_model(ModelSpec.from_dict(ck["model_spec"]))
    rebuilt.load_state_dict(ck["model"])
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert ck["format"] == "msnet-checkpoint/1"


def test_run_folder_resolves_to_last(tmp_path):
    _, _, p = payload()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", p)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    _, _, p = payload()
    path = save_checkpoint(tmp_path / "last.pt", p)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {**p, "epoch": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_bad_checkpoints_give_one_line(tmp_path):
    _, _, p = payload()
    path = save_checkpoint(tmp_path / "last.pt", p)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    cases = [
        (tmp_path / "missing.pt", "does not exist"),
        (truncated, "truncated"),
        (other, "not an msnet checkpoint"),
        (None, "no checkpoint given"),
        (tmp_path, "without checkpoints/last.pt"),
    ]
    for target, match in cases:
        with pytest.raises(MsnetError, match=match) as err:
            load_checkpoint(target)
        assert "\n" not in str(err.value)


def test_loading_refuses_pickled_code(tmp_path):
    """weights_only=True: a file that needs arbitrary unpickling is rejected, not executed."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "msnet-checkpoint/1", "x": Evil()}, path)
    with pytest.raises(MsnetError, match="weights_only=True"):
        load_checkpoint(path)


def test_documented_keys_are_what_train_and_transfer_write(tiny_cfg, compose_cfg, tmp_path):
    """runs.checkpoint.KEYS lists every key a written checkpoint holds, and each key is written by someone."""
    from msnet.runs import KEYS
    from msnet.runs.checkpoint import checkpoint_keys
    from msnet.tasks.transfer import transfer_checkpoint
    from msnet.training import train

    written = {}
    for name, over in {
        "first-order": [],
        "bcd": ["optimizer=bcd", "optimizer.cg_iters=2", "optimizer.classifier_steps=1"],
        "mgopt": ["trainer=mgopt", "model.layers=4", "trainer.coarse_steps=1"],
        "rmtr": ["trainer=rmtr", "model.layers=4", "trainer.coarse_steps=1"],
    }.items():
        train(tiny_cfg(over + ["trainer.epochs=1", "threads=1"]), tmp_path / name)
        written[name] = load_checkpoint(tmp_path / name)
    tcfg = compose_cfg("transfer", [f"ckpt={tmp_path / 'first-order'}", "source=fine", "target=coarse", "device=cpu"])
    transfer_checkpoint(tcfg, tmp_path / "moved")
    written["transfer"] = load_checkpoint(tmp_path / "moved" / "checkpoints" / "transferred.pt")

    for name, ck in written.items():
        undocumented = set(checkpoint_keys(ck)) - set(KEYS)
        assert not undocumented, f"{name} writes keys runs.checkpoint.KEYS does not document: {undocumented}"
    unwritten = set(KEYS) - {k for ck in written.values() for k in checkpoint_keys(ck)}
    assert not unwritten, f"KEYS documents keys nothing writes: {unwritten}"
    assert written["bcd"]["bcd"]["iterations"] > 0 and written["mgopt"]["mgopt"]["levels"]
    assert written["rmtr"]["rmtr"]["lsr1"][-1]["S"] and written["rmtr"]["optimizer"] is None
    assert written["transfer"]["transferred_from"]["level"] == "fine" and written["transfer"]["level"] == "coarse"
    assert written["transfer"]["config"]["level"] == "coarse" and written["transfer"]["resolution"] == [4, 4]


def test_make_payload_refuses_undocumented_rule_state():
    from msnet.runs import make_payload

    spec, model, _ = payload()
    with pytest.raises(ValueError, match="not in the checkpoint format"):
        make_payload(model, {"seed": 0}, epoch=0, level="fine", rule_state={"optimizer": None, "lbfgs": {}})


def test_restore_rebuilds_on_the_saved_dtype_and_honours_threads(tmp_path):
    from msnet.runs import make_payload, restore

    spec, model, _ = payload()
    model = model.double()
    save_checkpoint(tmp_path / "last.pt", make_payload(model, {"dtype": "float64"}, epoch=1, level="fine"))
    threads = torch.get_num_threads()
    try:
        r = restore(tmp_path / "last.pt", "cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert r.dtype == torch.float64 and r.device == torch.device("cpu")
    torch.testing.assert_close(r.model(x), model(x), rtol=0, atol=0)
