"""The Python entry point: ``msnet.train/evaluate/transfer`` compose the CLI's configs, write the CLI's run
folder, return the summary or records, raise MsnetError on bad input, and can be called again and again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import msnet
from msnet import MsnetError
from tests.test_cli import TINY, msnet as msnet_cli

API_TINY = [*TINY, "trainer.progress=false", "threads=1"]


def _files(run: Path) -> set:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def test_import_msnet_imports_neither_torch_nor_hydra():
    code = "import sys, msnet; print(sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(msnet.train) and callable(msnet.evaluate) and callable(msnet.transfer)


@pytest.mark.slow
def test_train_writes_the_run_folder_the_cli_writes(tmp_path):
    wrong = msnet_cli("train", "optimizer.lr=abc", cwd=tmp_path, check=False)
    with pytest.raises(MsnetError) as err:
        msnet.train(["optimizer.lr=abc"])
    assert wrong.returncode == 2 and wrong.stderr.strip() == f"error: {err.value}"  # the same line as the CLI's
    msnet_cli("train", *API_TINY, "hydra.run.dir=cli", cwd=tmp_path)
    summary = msnet.train(API_TINY, run_dir=tmp_path / "api")
    cli, api = tmp_path / "cli", tmp_path / "api"
    assert summary == json.loads((api / "summary.json").read_text())
    assert summary["status"] == "completed" and Path(summary["run_dir"]) == api
    # Hydra's job log is the one file the CLI writes and a library call does not (the caller's logging is left alone)
    assert _files(cli) - {"train.log"} == _files(api)
    for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (api / name).read_text() == (cli / name).read_text(), name
    assert (api / "command.txt").read_text() == (cli / "command.txt").read_text().replace("=cli", f"={api}")
    hydra_cli, hydra_api = (yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"] for d in (cli, api))
    assert hydra_api["overrides"]["hydra"] == [f"hydra.run.dir={api}", "hydra.mode=RUN"]
    assert hydra_api["runtime"]["choices"] == hydra_cli["runtime"]["choices"]
    assert hydra_api["job"]["name"] == hydra_cli["job"]["name"] == "train"
    # one seed, one thread: the same numbers, epoch by epoch
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (cli, api)]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-6), key


def test_train_twice_in_one_process_inside_hydra_and_default_run_folder(tmp_path, monkeypatch):
    """Called twice, and from inside a caller's own Hydra context, which is left as it was."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        outer = GlobalHydra.instance().hydra
        first = msnet.train(API_TINY)
        second = msnet.train([*API_TINY, "model.layers=2", "seed=3"])
        assert GlobalHydra.instance().hydra is outer and not HydraConfig.initialized()
        assert compose("train", ["model.layers=5"]).model.layers == 5  # the caller's Hydra still composes
    runs = sorted((tmp_path / "outputs" / "train").glob("*/*"))  # outputs/train/DATE/TIME, as the CLI's
    assert [Path(first["run_dir"]), Path(second["run_dir"])] == runs
    assert [yaml.safe_load((r / "config.yaml").read_text())["model"]["layers"] for r in runs] == [4, 2]
    assert first["depth"] == [4] and second["depth"] == [2]


@pytest.mark.parametrize("overrides,expected", [  # the command line's own lines (msnet.commands.type_error_line)
    (["model.layrs=8"], "model.layrs=8: model has no key 'layrs'; did you mean layers?"),
    (["optimizer.lr=abc"], "optimizer.lr=abc: optimizer.lr takes a number, e.g. optimizer.lr=0.002"),
    (["seed=null"], "seed=null: seed takes an integer, e.g. seed=0"),
    (["optimizer=adm"], "optimizer=adm: the group optimizer has no option 'adm'; choose one of adam, adamw"),
    (["model.layers=1,2"], "To sweep over it, add --multirun"),
    (["model.layers=[1"], "no viable alternative at input '[1'"),
    ("model.layers=8", "overrides are a list of strings"),
    (["-m", "model.layers=1,2"], "-m is a command-line flag"),
])
def test_bad_overrides_raise_one_line_errors_and_write_nothing(tmp_path, monkeypatch, overrides, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MsnetError) as err:
        msnet.train(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert not GlobalHydra.instance().is_initialized()


def test_an_error_of_the_run_itself_is_raised_not_exited(tmp_path):
    with pytest.raises(MsnetError, match="^model.layers must be at least 1, got 0$"):
        msnet.train([*API_TINY, "model.layers=0"], run_dir=tmp_path / "run")
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "run" / "error.txt").read_text() == "model.layers must be at least 1, got 0\n"  # as the CLI's


@pytest.mark.slow
def test_evaluate_and_transfer_from_python(tmp_path):
    summary = msnet.train(API_TINY, run_dir=tmp_path / "train")
    ckpt = Path(summary["checkpoint"])
    records = msnet.evaluate(ckpt=ckpt, run_dir=tmp_path / "eval")
    by_split = {r["split"]: r for r in records}
    assert by_split["val"]["acc"] == pytest.approx(summary["final_val_acc"])
    assert by_split["test"]["acc"] == pytest.approx(summary["final_test_acc"])
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["results"] == records
    assert (tmp_path / "eval" / "command.txt").read_text().startswith(f"msnet evaluate ckpt={ckpt}")
    rows = msnet.transfer(ckpt=ckpt, source_depth=4, target_depth=8, run_dir=tmp_path / "deeper")
    assert rows and (tmp_path / "deeper" / "checkpoints" / "transferred.pt").exists()
    moved = msnet.evaluate(ckpt=tmp_path / "deeper" / "checkpoints" / "transferred.pt", run_dir=tmp_path / "eval8")
    assert {r["split"] for r in moved} == {"val", "test"}
    with pytest.raises(MsnetError, match="say both depths"):
        msnet.transfer(ckpt=ckpt, source_depth=4, run_dir=tmp_path / "half")
