#!/usr/bin/env python
"""The GPU check: every measurement msnet needs from a GPU, in one budgeted run, written as markdown + JSON.

Run it through ``scripts/gpu_check.sh``, which finds a Python, installs carried wheels and
this checkout's msnet into a scratch folder, points msnet at carried Fashion-MNIST files,
and then calls this file. Steps, in order of value (a later step gets what budget is left):

1. ``env``        device, driver-side versions (torch, CUDA, cuDNN, Python) and TF32 defaults;
2. ``cuda_tests`` ``pytest -m cuda`` on the test files that mark tests ``cuda``: every CUDA-only
                  test, among them the reversible reconstruction and store-vs-reversible
                  gradient tests on CUDA;
3. ``precision``  ``scripts/bench/reversible_precision.py``: reversible vs store gradients by depth
                  (4 -> 256) in float32 with TF32 off and on, and under bf16;
4. ``memory``     ``scripts/bench/bench_memory.py``: saved bytes, peak CUDA memory and step time,
                  store vs reversible, depth 4 -> 256;
5. ``fashion``    ``msnet train``: the default network on Fashion-MNIST (3 epochs), wall time;
6. ``hamiltonian`` ``msnet train model=hamiltonian model.backprop=reversible trainer.epochs=1``;
7. ``bench_gpu``  ``scripts/bench/bench_gpu.py``: images/s of msnet's trainer against a hand-written
                  loop, 4 and 32 layers, eager and compiled, fp32 and bf16.

Each step runs in a child process forked from this one (torch and msnet are imported once;
CUDA is first touched in the child), in its own process group, with a timeout; a step that
fails or runs out of time is recorded as such and the next one runs. Every step writes its
numbers to a JSON file as it goes, so a step cut short keeps what it measured.

``--dry-run``: the same steps on the CPU (CUDA hidden) at toy sizes, in under a minute, into
``--out`` (default ``outputs/gpu_check_dry``); the docs are not touched. A real run writes into
``--out`` (default ``$OUT`` when set, else ``docs/gpu``) and publishes the table into
``docs/gpu.md``; ``--publish DIR`` publishes the results of a run made elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import runpy
import shutil
import signal
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "bench"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_marked.py, also when a test loads this file by path
from _marked import MarkedSection  # noqa: E402

RESULT_FILES = ("gpu_check.md", "gpu_check.json")


@dataclass
class Step:
    """One measurement: ``run(ctx, result_path)`` runs in a forked child; a non-zero exit or an exception fails it."""

    name: str
    title: str
    cap_s: float  # timeout of a real run; a dry run's is cap_s / 10, at least 60 s (toy steps take 2-8 s alone, several times that beside other jobs)
    run: Callable[["Context", Path], int]


@dataclass
class Context:
    dry: bool
    work: Path
    out: Path
    fashion: bool  # Fashion-MNIST files are on disk
    results: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- steps


def step_env(ctx: Context, path: Path) -> int:
    import torch

    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "host": platform.node(), "cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
        "fashion_mnist": ctx.fashion, "commit": os.environ.get("MSNET_CHECK_COMMIT", "unknown"),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        info["torchvision"] = f"missing ({type(err).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"sm_{p.major}{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    conv_fp32_precision=torch.backends.cudnn.conv.fp32_precision,
                    matmul_fp32_precision=torch.backends.cuda.matmul.fp32_precision)
    path.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


def step_cuda_tests(ctx: Context, path: Path) -> int:
    import pytest

    xml = ctx.work / "cuda_tests.xml"
    os.chdir(REPO)
    # the test files that mark anything `cuda` (collecting the other files would select nothing, slowly)
    files = [str(f) for f in sorted((REPO / "tests").glob("test_*.py")) if "mark.cuda" in f.read_text()]
    code = int(pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]))
    counts: Dict[str, Any] = {"exit_code": code}
    if xml.exists():
        cases = ET.parse(xml).getroot().iter("testcase")
        outcome: Dict[str, List[str]] = {"passed": [], "failed": [], "skipped": []}
        for case in cases:
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            kinds = {child.tag for child in case}
            kind = "failed" if kinds & {"failure", "error"} else ("skipped" if "skipped" in kinds else "passed")
            outcome[kind].append(name)
        counts.update({k: len(v) for k, v in outcome.items()}, failed_tests=outcome["failed"])
    path.write_text(json.dumps(counts, indent=1))
    return 0 if code in (0, 5) and not counts.get("failed") else 1


def run_script(script: str, args: List[str]) -> int:
    """``python scripts/bench/SCRIPT ARGS`` in this process (it is a forked child): its exit code."""
    sys.argv = [str(SCRIPTS / script), *args]
    try:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def step_precision(ctx: Context, path: Path) -> int:
    toy = ["--depths", "2", "4", "--channels", "4", "--size", "8", "--batch", "2"]
    return run_script("reversible_precision.py", (toy if ctx.dry else ["--depths", "4", "16", "64", "256"])
                      + ["--json", str(path)])


def step_memory(ctx: Context, path: Path) -> int:
    toy = ["--depths", "2", "4", "--channels", "4", "--size", "8", "--batch", "2", "--repeats", "1"]
    real = ["--depths", "4", "16", "64", "256", "--repeats", "3"]
    return run_script("bench_memory.py", (toy if ctx.dry else real) + ["--json", str(path)])


def msnet_train(ctx: Context, path: Path, name: str, overrides: List[str]) -> int:
    """``msnet train OVERRIDES`` in this process; the run's summary.json, plus wall time, into ``path``."""
    from msnet.cli import main

    run_dir = ctx.work / "runs" / name
    data = [] if ctx.fashion else ["dataset=synthetic", "dataset.image_size=28", "dataset.num_classes=10"]
    argv = ["train", *data, *overrides, "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    sys.argv = ["msnet", *argv]
    t = time.perf_counter()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - t
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    keep = ("status", "dataset", "device", "epochs", "parameters", "final_test_acc", "final_val_acc",
            "final_train_loss", "wall_time_s", "setup_time_s", "data_sizes")
    record = {"command": "msnet " + " ".join(a for a in argv if not a.startswith("hydra.run.dir")),
              "process_wall_s": round(wall, 1), **{k: summary[k] for k in keep if k in summary}}
    path.write_text(json.dumps(record, indent=1))
    return code or (0 if summary.get("status") == "completed" else 1)


TOY_DATA = ["dataset.train_subset=256", "dataset.val_size=64", "dataset.test_subset=128"]


def step_fashion(ctx: Context, path: Path) -> int:
    return msnet_train(ctx, path, "default", TOY_DATA + ["trainer.epochs=1", "model.channels=4"] if ctx.dry else [])


def step_hamiltonian(ctx: Context, path: Path) -> int:
    base = ["model=hamiltonian", "model.backprop=reversible", "trainer.epochs=1"]
    toy = TOY_DATA + ["model.widths=[4,8,8]", "model.layers=1"]
    return msnet_train(ctx, path, "hamiltonian", base + (toy if ctx.dry else []))


def step_bench_gpu(ctx: Context, path: Path) -> int:
    toy = ["--quick", "--images", "64", "--channels", "4", "--batch-size", "32", "--dataset", "synthetic"]
    return run_script("bench_gpu.py", (toy if ctx.dry else ["--images", "10000", "--repeats", "3"])
                      + ["--json", str(path)])


STEPS = [
    Step("env", "Machine and versions", 60, step_env),
    Step("cuda_tests", "CUDA-only tests (pytest -m cuda)", 150, step_cuda_tests),
    Step("precision", "Reversible vs store gradients by depth (scripts/bench/reversible_precision.py)", 150, step_precision),
    Step("memory", "Activation memory, peak CUDA memory and step time (scripts/bench/bench_memory.py)", 120, step_memory),
    Step("fashion", "Fashion-MNIST, the default network (msnet train)", 150, step_fashion),
    Step("hamiltonian", "One epoch of model=hamiltonian, reversible backprop (msnet train)", 180, step_hamiltonian),
    Step("bench_gpu", "Trainer throughput against a hand-written loop (scripts/bench/bench_gpu.py)", 300, step_bench_gpu),
]
MIN_STEP_S = 30.0  # a real step given less than this is skipped; a dry one: 5 s


# ------------------------------------------------------------------------------------- running


def run_forked(step: Step, ctx: Context, timeout: float, log: Path) -> Dict[str, Any]:
    """Run ``step`` in a forked child (own process group, output to ``log``); status, exit code, seconds."""
    result_path = ctx.work / f"{step.name}.json"
    sys.stdout.flush()
    sys.stderr.flush()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = step.run(ctx, result_path)
        except BaseException:  # noqa: BLE001 - the child reports everything and exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    status, code = "timeout", None
    while time.perf_counter() - t < timeout:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(raw)
            status = "ok" if code == 0 else "failed"
            break
        time.sleep(0.05)
    try:  # the child if it ran out of time, and whatever it left running in its group (compile workers, ...)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if status == "timeout":
        os.waitpid(pid, 0)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return {"status": status, "exit_code": code, "seconds": round(time.perf_counter() - t, 1),
            "timeout_s": round(timeout), "result": result}


def log_tail(log: Path, start: int, chars: int = 1500) -> str:
    text = log.read_text(errors="replace")[start:] if log.exists() else ""
    return text[-chars:]


# ------------------------------------------------------------------------------------- markdown


def md_table(rows: List[Dict[str, Any]], columns: Optional[List[str]] = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.3g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def step_summary(name: str, rec: Dict[str, Any]) -> str:
    res = rec.get("result") or {}
    if rec.get("reason"):
        return rec["reason"]
    if name == "env":
        return res.get("gpu", "no GPU") if res else ""
    if name == "cuda_tests" and res:
        return f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped"
    if name in ("fashion", "hamiltonian") and res:
        acc = res.get("final_test_acc")
        return (f"test acc {acc:.4f}, " if isinstance(acc, float) else "") + f"{res.get('process_wall_s', '?')} s wall"
    if isinstance(res, dict) and "rows" in res:
        return f"{len(res['rows'])} rows"
    return ""


def markdown(report: Dict[str, Any]) -> str:
    env = (report["steps"].get("env") or {}).get("result") or {}
    machine = (f"{env['gpu']} ({env.get('capability')}, {env.get('gpu_memory_gib')} GiB)" if env.get("gpu")
               else "CPU (no CUDA device visible)")
    lines = [f"### GPU check, {report['date']}" + (" (DRY RUN: CPU, toy sizes; no number here describes a GPU)"
                                                   if report["dry_run"] else ""), ""]
    lines += [f"- machine: {machine}; host {env.get('host', '?')}",
              f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn', '-')}, "
              f"torchvision {env.get('torchvision', '?')}, Python {env.get('python', '?')}; msnet {env.get('commit', '?')}",
              f"- defaults seen: cuDNN conv fp32_precision {env.get('conv_fp32_precision', '-')}, "
              f"matmul {env.get('matmul_fp32_precision', '-')}",
              f"- command: `{report['command']}`; {report['total_s']} s of a {report['budget_s']} s budget", ""]
    lines += [md_table([{"step": name, "status": rec["status"], "seconds": rec.get("seconds"),
                         "summary": step_summary(name, rec)} for name, rec in report["steps"].items()]), ""]
    for step in STEPS:
        rec = report["steps"].get(step.name)
        if not rec or step.name == "env":
            continue
        res = rec.get("result")
        lines += [f"#### {step.title}: {rec['status']}", ""]
        if step.name == "cuda_tests" and res:
            lines.append(step_summary(step.name, rec) + ".")
            if res.get("failed_tests"):
                lines.append("Failed: " + ", ".join(f"`{t}`" for t in res["failed_tests"]))
        elif step.name in ("fashion", "hamiltonian") and res:
            lines.append(md_table([res], [c for c in ("command", "device", "dataset", "epochs", "final_test_acc",
                                                      "final_val_acc", "wall_time_s", "process_wall_s") if c in res]))
        elif isinstance(res, dict) and res.get("rows"):
            setting = res.get("setting")
            if setting:
                lines += [f"Setting: `{json.dumps(setting)}`", ""]
            lines.append(md_table(res["rows"]))
        if rec["status"] != "ok" and rec.get("tail"):
            lines += ["", "```", rec["tail"].strip()[-800:], "```"]
        lines.append("")
    return "\n".join(lines)


def publish(results: Path, docs: Path = REPO / "docs") -> None:
    """Copy a run's gpu_check.md/json into docs/gpu/ and put the markdown between docs/gpu.md's markers."""
    report = json.loads((results / "gpu_check.json").read_text())
    if report.get("dry_run"):
        raise SystemExit("gpu_check: refusing to publish a dry run into docs/gpu.md")
    section, target = MarkedSection(docs / "gpu.md", BEGIN, END, "gpu_check"), docs / "gpu"
    section.split()  # a page without its markers stops here, before anything is copied
    target.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (results / name).resolve() != (target / name).resolve():
            shutil.copyfile(results / name, target / name)
    body = (results / "gpu_check.md").read_text().strip()
    section.replace(f"{body}\n\n(JSON: [gpu/gpu_check.json](gpu/gpu_check.json))\n")
    print(f"gpu_check: published into {section.page} and {target}")


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, under a minute; docs untouched")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md/.json/.log")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all steps (real 450, dry 140)")
    ap.add_argument("--only", default=None, help="comma-separated step names (env always runs)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (gpu_check.sh makes one)")
    ap.add_argument("--publish", type=Path, default=None, metavar="DIR",
                    help="only publish DIR/gpu_check.md into docs/gpu.md (and copy it and the JSON to docs/gpu/)")
    args = ap.parse_args()
    if args.publish:
        publish(args.publish)
        return 0

    dry = args.dry_run
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's, even on a GPU machine
    out = args.out or Path(os.environ["OUT"] if os.environ.get("OUT") and not dry else
                           REPO / ("outputs/gpu_check_dry" if dry else "docs/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"msnet-gpu-check-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (140.0 if dry else 450.0)
    fashion_dirs = [os.environ.get("MSNET_FASHION_DIR"), "/usr/share/datasets/fashion-mnist"]
    staged = Path(os.environ.get("MSNET_DATA", "~/.cache/msnet/data")).expanduser() / "FashionMNIST/raw/train-images-idx3-ubyte"
    fashion = staged.exists() or any(d and Path(d, "train-images-idx3-ubyte.gz").exists() for d in fashion_dirs)
    ctx = Context(dry=dry, work=work, out=out, fashion=fashion)

    # Import once here, so that every forked step starts with them loaded (CUDA is not touched).
    import torch  # noqa: F401
    import pytest  # noqa: F401
    import msnet.cli  # noqa: F401
    import msnet.training  # noqa: F401
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:  # noqa: BLE001 - the env step records it
        pass

    log = out / "gpu_check.log"
    log.write_text("")
    command = "scripts/gpu_check.sh " + " ".join(a for a in sys.argv[1:] if not a.startswith("--work")
                                                   and a != str(args.work))
    wanted = None if not args.only else {"env", *args.only.split(",")}
    report: Dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": dry,
                              "command": command.strip(), "budget_s": budget, "steps": {}}
    min_s = 5.0 if dry else MIN_STEP_S
    t0 = time.perf_counter()

    def write() -> None:  # after every step, so that a check killed from outside keeps what it finished
        report["total_s"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))

    steps = [s for s in STEPS if wanted is None or s.name in wanted]
    for i, step in enumerate(steps):
        # each later step keeps min_s of the budget; this one gets at least min_s while that much is left
        left = budget - (time.perf_counter() - t0)
        cap = max(60.0, step.cap_s / 10) if dry else step.cap_s
        timeout = min(cap, left if left < min_s else max(min_s, left - min_s * (len(steps) - i - 1)))
        start = log.stat().st_size
        with log.open("a") as f:
            f.write(f"\n===== {step.name}: {step.title} (timeout {timeout:.0f} s) =====\n")
        if timeout < min_s:
            rec = {"status": "skipped", "reason": f"out of budget ({left:.0f} s left)", "seconds": 0.0}
        else:
            print(f"gpu_check: {step.name} ... ", end="", flush=True)
            rec = run_forked(step, ctx, timeout, log)
            print(f"{rec['status']} ({rec['seconds']} s)", flush=True)
            if rec["status"] != "ok":
                rec["tail"] = log_tail(log, start)
        report["steps"][step.name] = rec
        write()
        if step.name == "env" and not dry and not (rec.get("result") or {}).get("cuda_available"):
            print("gpu_check: no CUDA device is visible; the real check needs one (use --dry-run on a CPU)")
            report["error"] = "no CUDA device visible"
            break
    write()
    print(f"gpu_check: {report['total_s']} s; results in {out}/gpu_check.md, .json, .log")
    failed = [n for n, r in report["steps"].items() if r["status"] != "ok"]
    if not dry and not report.get("error") and (REPO / "docs" / "gpu.md").exists():
        try:
            publish(out)
        except SystemExit as exc:
            print(exc)
    if failed or report.get("error"):
        print("gpu_check: not ok: " + ", ".join(failed or ["env"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
