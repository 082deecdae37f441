"""Nothing silently changes an experiment: unknown keys and experiments, a data root that does not exist, and a
reader that goes away (``| head``) each get one line or no effect on the run, never a silent change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msnet import MsnetError
from msnet.training import train
from tests.test_cli import TINY, msnet


@pytest.mark.parametrize("override,line", [
    ("+trainer.foo=1", "+trainer.foo=1: trainer has no key 'foo'"),
    ("+trainer.patiense=3", "+trainer.patiense=3: trainer has no key 'patiense'; did you mean patience"),
    ("+model.layrs=2", "+model.layrs=2: model has no key 'layrs'; did you mean layers?"),
    ("+baz=3", "+baz=3: the config has no key 'baz'"),
])
def test_an_unknown_key_is_refused_before_anything_is_written(tiny_cfg, tmp_path, override, line):
    with pytest.raises(MsnetError) as err:
        train(tiny_cfg([override]), tmp_path / "run", overrides=[override])
    assert str(err.value).startswith(line)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_keys_are_found_in_every_group_option(compose_cfg):
    from msnet.config import unknown_keys

    for overrides in (["+pyramid=2level", "+pyramid.foo=1"], ["+depth=doubling", "+depth.foo=1"],
                      ["trainer=mgopt", "+trainer.foo=1"], ["optimizer=bcd", "+optimizer.foo=1"],
                      ["logger=mlflow", "+logger.foo=1"]):
        key = overrides[1][1:].split("=")[0]
        assert [k for k, _ in unknown_keys(compose_cfg("train", overrides))] == [key]
        assert unknown_keys(compose_cfg("train", overrides[:1])) == []  # the option itself is clean
    assert [k for k, _ in unknown_keys(compose_cfg("evaluate", ["+foo=1"]))] == ["foo"]


def test_evaluate_refuses_an_unknown_key(compose_cfg, tmp_path):
    from msnet.tasks.evaluate import evaluate_checkpoint

    with pytest.raises(MsnetError, match="the config has no key 'foo'"):
        evaluate_checkpoint(compose_cfg("evaluate", ["+foo=1", f"ckpt={tmp_path / 'none.pt'}"]))


def test_a_data_root_that_does_not_exist_is_refused_and_not_created(tiny_cfg, tmp_path):
    from omegaconf import open_dict

    from msnet.data.sources import data_root

    cfg = tiny_cfg(["dataset=fashion_mnist"]).dataset
    with open_dict(cfg):
        cfg.root = str(tmp_path / "nonexistent" / "data")
    with pytest.raises(MsnetError, match=r"dataset.root=.*does not exist; .*dataset.create_root=true"):
        data_root(cfg)
    assert not (tmp_path / "nonexistent").exists()
    (tmp_path / "file").write_text("")
    cfg.root = str(tmp_path / "file")
    with pytest.raises(MsnetError, match="is a file, not a folder"):
        data_root(cfg)
    cfg.root, cfg.create_root = str(tmp_path / "made" / "data"), True
    assert data_root(cfg) == tmp_path / "made" / "data" and (tmp_path / "made" / "data").is_dir()


def test_the_default_data_cache_is_created(tiny_cfg, tmp_path, monkeypatch):
    from msnet.data.sources import data_root

    monkeypatch.setenv("MSNET_DATA", str(tmp_path / "cache"))
    cfg = tiny_cfg(["dataset=fashion_mnist"]).dataset  # root: ${oc.env:MSNET_DATA,...}
    assert data_root(cfg) == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_a_lost_reader_drops_the_console_output_only():
    from msnet.runs.display import RunConsole, Survivable

    read, write = os.pipe()
    os.close(read)  # the reader went away: every write to the pipe is a broken pipe
    stream = os.fdopen(write, "w")
    safe = Survivable(stream)
    assert safe.write("x" * 100_000) == 100_000 and safe.lost
    safe.write("more")
    safe.flush()  # no exception, and the descriptor now points at /dev/null
    stream.write("interpreter's own flush at exit")
    stream.flush()
    console = RunConsole()
    console.console.file.lost = True
    console.print("nothing reaches stdout, but it is recorded")
    assert "recorded" in console.console.export_text(clear=False)


@pytest.mark.slow
def test_an_unknown_experiment_is_one_line(tmp_path):
    proc = msnet("train", "experiment=fashion_quik", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: experiment=fashion_quik: the group experiment has no option 'fashion_quik'; "
                                   "choose one of bcd_fashion, fashion_quick, pyramid_fashion")


@pytest.mark.slow
def test_a_run_piped_into_head_finishes_and_writes_its_files(tmp_path):
    exe = Path(sys.executable).with_name("msnet")
    proc = subprocess.Popen([str(exe), "train", *TINY, "trainer.epochs=3", "hydra.run.dir=run"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # `| head -1`: read one line, then go away
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert first.startswith("msnet train") and proc.returncode == 0, err
    assert err == ""
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3
    assert "summary" in (tmp_path / "run" / "console.txt").read_text().lower()
