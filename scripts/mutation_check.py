#!/usr/bin/env python
"""Plant plausible one-line bugs in msnet's numerical core and check that the tests catch each one.

Each mutation names a file, an exact piece of its text, the text that replaces it, what bug that
plants, and the few test files (or node ids) that should notice. For every mutation the script
copies the repository (``msnet/``, ``conf/``, ``tests/``, ``pyproject.toml``) into a scratch folder,
applies that one replacement there, and runs

    python -m pytest -q -x -p no:cacheprovider TESTS

in the copy (cwd and ``PYTHONPATH`` set to it; ``conf/`` is also placed at ``msnet/conf`` so that the
copy's configs are the ones loaded). A mutation is *caught* when pytest reports failing tests,
*survived* when they all pass. The unmutated copy runs the same tests once first: if they do not pass
the baseline is broken and nothing is mutated. Before anything runs, every mutation's original text
must occur exactly once in its file, so the list fails loudly instead of rotting when code moves.

    .venv/bin/python scripts/mutation_check.py              # all 27 (2.5 min on a quiet 2-core CPU, 5 to 7 min shared)
    .venv/bin/python scripts/mutation_check.py --list       # what would be planted, and where
    .venv/bin/python scripts/mutation_check.py -k classifier --jobs 2

Exit status 0 when every selected mutation is caught; 1 when one survives, cannot be applied, or
the baseline fails. Run it before landing a change to the core, and add a mutation (with the test
that catches it) when you add an oracle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("msnet", "conf", "tests", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


@dataclass(frozen=True)
class Mutation:
    """One planted bug: in ``path`` (relative to the repository) ``original`` becomes ``replacement``."""

    name: str
    path: str
    original: str
    replacement: str
    description: str
    tests: Tuple[str, ...] = field(default_factory=tuple)


MUTATIONS: List[Mutation] = [
    # --- space: image operators, the Galerkin stencil map, whole-network transfer ------------------
    Mutation(
        "stencil-map-flip", "msnet/multigrid/space.py",
        "M[:, q] = window.flip(0, 1).reshape(-1)",
        "M[:, q] = window.reshape(-1)",
        "Galerkin map read as a convolution instead of conv2d's cross-correlation (window not flipped)",
        ("tests/test_multigrid_space.py::test_galerkin_identity_away_from_boundary",),
    ),
    Mutation(
        "stencil-prolong-transpose", "msnet/multigrid/space.py",
        "fine = torch.linalg.solve(M.to(flat.device), flat.T).T",
        "fine = torch.linalg.solve(M.T.to(flat.device), flat.T).T",
        "stencil prolongation solves with M^T instead of M",
        ("tests/test_multigrid_space.py::test_restrict_prolong_round_trip",),
    ),
    Mutation(
        "image-restriction-scale", "msnet/multigrid/space.py",
        "return F.conv2d(y, _depthwise(self.KERNEL / 16, c, y), stride=2, padding=1, groups=c)",
        "return F.conv2d(y, _depthwise(self.KERNEL / 8, c, y), stride=2, padding=1, groups=c)",
        "full weighting R = P^T / 2 instead of P^T / 4 (constants doubled)",
        ("tests/test_multigrid_space.py::test_linear_is_the_default_and_full_weighting_is_p_transpose_over_4",),
    ),
    Mutation(
        "classifier-prolong-scale", "msnet/multigrid/network.py",
        "W = image_op.prolong(W) if levels > 0 else image_op.restrict(W)",
        "W = 4 * image_op.prolong(W) if levels > 0 else image_op.restrict(W)",
        "classifier prolonged off by h^d (4 P W): argmax cannot see it",
        ("tests/test_pyramid.py::test_full_field_classifier_keeps_the_inner_product_both_ways",),
    ),
    Mutation(
        "classifier-restrict-scale", "msnet/multigrid/network.py",
        "W = image_op.prolong(W) if levels > 0 else image_op.restrict(W)",
        "W = image_op.prolong(W) if levels > 0 else image_op.restrict(W) / 4",
        "classifier restricted off by h^d (R W / 4)",
        ("tests/test_pyramid.py::test_full_field_classifier_keeps_the_inner_product_both_ways",),
    ),
    Mutation(
        "classifier-mu-dropped", "msnet/multigrid/network.py",
        'state["classifier.mu"] = src_clf.mu.detach()',
        'state["classifier.mu"] = torch.zeros_like(src_clf.mu)',
        "the classifier's bias mu is not carried over (it starts at zero, so only a trained mu shows it)",
        ("tests/test_pyramid.py::test_full_field_classifier_keeps_the_inner_product_both_ways",),
    ),
    Mutation(
        "stencils-one-level-only", "msnet/multigrid/network.py",
        "            for _ in range(abs(levels)):\n                t = move(t, op)",
        "            for _ in range(1):\n                t = move(t, op)",
        "a two-level transfer moves the stencils one level only",
        ("tests/test_pyramid.py::test_two_level_transfer_is_galerkin_from_grid_to_grid",),
    ),
    # --- time: Runge-Kutta, linear multistep, reversible schemes -----------------------------------
    Mutation(
        "rk4-weights", "msnet/core/integrators.py",
        "b = (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0)",
        "b = (1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0)",
        "RK4 with the 3/8 rule's weights on the classical nodes (second order)",
        ("tests/test_integrators.py::test_runge_kutta_tableau_satisfies_the_order_conditions_of_its_order",),
    ),
    Mutation(
        "rk-stage-input", "msnet/core/integrators.py",
        "ks.append(f(j, y_i))",
        "ks.append(f(j, y))",
        "every Runge-Kutta stage evaluated at y_j instead of its stage value",
        ("tests/test_integrators.py::test_runge_kutta_step_is_its_tableau",),
    ),
    Mutation(
        "lm-step-sign", "msnet/core/multistep.py",
        "u, u_prev = u + h * f(j, u) - k[j] * (u - u_prev), u",
        "u, u_prev = u + h * f(j, u) + k[j] * (u - u_prev), u",
        "LM step with the k_n term's sign flipped",
        ("tests/test_multistep.py::test_lm_step_by_step",),
    ),
    Mutation(
        "lm-first-step", "msnet/core/multistep.py",
        "u = y0 + (h / (1.0 + k[0])) * f(0, y0)",
        "u = y0 + h * f(0, y0)",
        "LM start step not rescaled by 1 / (1 + k_0)",
        ("tests/test_multistep.py::test_lm_step_by_step",),
    ),
    Mutation(
        "reversible-undo", "msnet/core/reversible.py",
        "old = torch.sub(old, v, alpha=c)",
        "old = torch.add(old, v, alpha=c)",
        "reversible inverse sub-step adds the F term instead of subtracting it",
        ("tests/test_reversible.py::test_inverse_steps_rebuild_every_state",),
    ),
    Mutation(
        "reversible-backprop-beta", "msnet/core/reversible.py",
        "g[u.src] = g[u.src] + u.beta * g_dst",
        "g[u.src] = g[u.src] - u.beta * g_dst",
        "reversible backprop pulls the beta x[src] term's gradient back with the wrong sign (leapfrog)",
        ("tests/test_reversible.py::test_reversible_gradients_equal_stored_ones",),
    ),
    Mutation(
        "depth-transfer-time-reversed", "msnet/multigrid/time.py",
        "return {k: f(v.detach(), m) for k, v in params.items()}",
        "return {k: f(v.detach(), m).flip(0) for k, v in params.items()}",
        "a network prolonged in time gets its per-step parameters in reverse order",
        ("tests/test_depth.py::test_moved_network_agrees_with_its_source_to_first_order_in_h",),
    ),
    Mutation(
        "time-prolong-weights", "msnet/multigrid/time.py",
        "return theta[j] * (1 - w).view(shape) + theta[nxt] * w.view(shape)",
        "return theta[j] * w.view(shape) + theta[nxt] * (1 - w).view(shape)",
        "linear prolongation in time with the interpolation weights swapped (samples shifted by a step)",
        ("tests/test_depth.py::test_linear_doubling_places_old_samples_at_even_steps",),
    ),
    Mutation(
        "time-restrict-average", "msnet/multigrid/time.py",
        "return theta.reshape(n, r, *theta.shape[1:]).mean(dim=1)",
        "return theta.reshape(n, r, *theta.shape[1:]).sum(dim=1) / n",
        "average restriction in time divides by the coarse depth instead of the ratio",
        ("tests/test_depth.py::test_restrict_prolong_is_identity_for_exact_pairs",),
    ),
    # --- data fit, optimisers ----------------------------------------------------------------------
    Mutation(
        "datafit-bias-prior", "msnet/multigrid/datafit.py",
        "prior = torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1).double().T",
        "prior = torch.cat([weight.reshape(weight.shape[0], -1), 0 * bias[:, None]], 1).double().T",
        "the fit's ridge pulls the biases towards 0 instead of the Galerkin biases (going coarser)",
        ("tests/test_datafit.py::test_every_fitted_layer_solves_its_normal_equations[coarser-linear]",),
    ),
    Mutation(
        "gauss-newton-hessian", "msnet/training/newton.py",
        "return (pu - probs * pu.sum(dim=1, keepdim=True)) / probs.shape[0]",
        "return pu / probs.shape[0]",
        "cross-entropy Hessian in logit space without its rank-one term (diag(p) instead of diag(p) - p p^T)",
        ("tests/test_bcd.py::test_gauss_newton_product_equals_explicit_jacobians",),
    ),
    Mutation(
        "newton-forcing-term", "msnet/training/newton.py",
        "cg = conjugate_gradient(apply, [-gi for gi in g], cg_iters, rtol=min(0.5, gnorm))",
        "cg = conjugate_gradient(apply, [-gi for gi in g], cg_iters, rtol=0.5)",
        "Newton-CG with a fixed CG tolerance 1/2 instead of min(1/2, ||g||): linear, not quadratic, convergence",
        ("tests/test_bcd.py::test_newton_cg_on_the_classifier_converges_quadratically_to_the_lbfgs_optimum",),
    ),
    Mutation(
        "bcd-stale-features", "msnet/training/bcd.py",
        'feats1 = trial["feats"] if a > 0 else feats0',
        "feats1 = feats0",
        "BCD's classifier block solves on the features from before the propagation step",
        ("tests/test_bcd.py::test_bcd_iteration_is_monotone_and_both_blocks_move",),
    ),
    Mutation(
        "mgopt-coherence", "msnet/training/hierarchy.py",
        "coarse.tau = [a - move(tr.G, st, b) for a, b, st in zip(gc, g, fine.stage)]",
        "coarse.tau = [a - move(tr.R, st, b) for a, b, st in zip(gc, g, fine.stage)]",
        "the coherence term MG/OPT and RMTR share (hierarchy.couple_coarse) restricts the fine gradient with R "
        "(injection) instead of P^T",
        ("tests/test_mgopt.py::test_first_order_coherence_on_every_level",
         "tests/test_rmtr.py::test_first_order_coherence_on_every_level"),
    ),
    Mutation(
        "rmtr-room", "msnet/training/rmtr.py",
        "                step_radius = min(step_radius, left / self.p_norm[i + 1])",
        "                step_radius = min(step_radius, left)",
        "RMTR's coarse steps forget that P can lengthen them (||P s_c|| <= ||P|| ||s_c||): the prolonged step may "
        "leave the fine trust region",
        ("tests/test_rmtr.py::test_prolonged_coarse_step_respects_the_fine_radius",),
    ),
    Mutation(
        "rmtr-radius-shrink", "msnet/training/rmtr.py",
        "        return s.gamma1 * step_radius",
        "        return s.gamma1 * radius",
        "RMTR shrinks a rejected step's level radius instead of the step's own (room-limited) radius",
        ("tests/test_rmtr.py::test_radius_rules",),
    ),
    Mutation(
        "mgopt-rejected-correction-kept", "msnet/training/mgopt.py",
        "        for p, a in zip(lv.params, x0):\n            p.copy_(a)\n        return 0.0, None",
        "        return 0.0, None",
        "MG/OPT keeps the last trial of a correction its line search rejected",
        ("tests/test_mgopt.py::test_armijo_correction_is_checked_outside_the_cycle",),
    ),
    Mutation(
        "mgopt-correction", "msnet/training/mgopt.py",
        "e = [move(tr.P, st, pc - c0) for pc, c0, st in zip(coarse.params, xc0, fine.stage)]",
        "e = [move(tr.P, st, pc) for pc, c0, st in zip(coarse.params, xc0, fine.stage)]",
        "MG/OPT prolongs the coarse weights instead of the coarse correction x_H - R x_h",
        ("tests/test_mgopt.py::test_prolonged_coarse_step_is_the_predicted_descent_step",),
    ),
    Mutation(
        "warm-norm-stops-early", "msnet/core/residual.py",
        "if warm and before is not None and i + 1 >= warm_iters and bool",
        "if warm and bool",
        "a warm-started stencil norm stops after one power iteration, whatever the change since the last",
        ("tests/test_stability.py::test_step_bound_holds_after_training_with_a_large_learning_rate",),
    ),
    Mutation(
        "state-norms-miss-schemes", "msnet/core/reversible.py",
        "        if probe is not None:\n            probe(j, scheme.finish(state))\n        theta",
        "        theta",
        "the state-norm probe does not see a reversible scheme's states with backprop=store",
        ("tests/test_stability.py::test_state_norms_see_every_state_of_every_integrator",),
    ),
    Mutation(
        "carry-unscaled", "msnet/multigrid/time.py",
        "value = TIME_PROLONGATIONS.get(op)(value, p.shape[0]) * ratio ** MOMENT_POWERS[key]",
        "value = TIME_PROLONGATIONS.get(op)(value, p.shape[0])",
        "carried optimiser moments are prolonged but not scaled for the smaller step",
        ("tests/test_depth_carry.py::test_adam_moments_are_prolonged_like_the_weights_and_scaled_for_h",),
    ),
    Mutation(
        "smooth-init-injection-offset", "msnet/multigrid/time.py",
        'fine = prolong_in_time(restrict_in_time(params, knots, "injection"), n, op)',
        'fine = prolong_in_time(restrict_in_time(params, knots, "average"), n, op)',
        "the time-smooth start interpolates means of the draws instead of the draws at the knots",
        ("tests/test_time_init.py::test_smoothed_steps_are_the_linear_interpolant_of_the_draws_at_the_knots",),
    ),
    Mutation(
        "bf16-explicit-state", "msnet/core/network.py",
        "return self.integrator.integrate(f, state_dtype(y, dtype), self.h, self.layers, own)",
        "return self.integrator.integrate(f, y, self.h, self.layers, own)",
        "under bf16 autocast an Euler/RK/LM stage keeps autocast's bf16 state",
        ("tests/test_precision.py::test_bf16_keeps_every_integrators_state_in_float32",),
    ),
    Mutation(
        "plateau-delta-sign", "msnet/training/schedule.py",
        "return min(losses[-patience:]) >= min(losses[:-patience]) - min_delta",
        "return min(losses[-patience:]) >= min(losses[:-patience]) + min_delta",
        "trainer.min_delta demands a rise instead of allowing a small drop",
        ("tests/test_level_patience.py",),
    ),
    Mutation(
        "plateau-level-goes-on", "msnet/training/fit.py",
        "            if over:  # all its epochs, or a validation plateau (trainer.level_patience)",
        "            if over and not state.ended_early(schedule):",
        "a level that has plateaued trains on to its scheduled epochs",
        ("tests/test_level_patience.py",),
    ),
    Mutation(
        "best-checkpoint-ties", "msnet/training/state.py",
        "return not before or (now > max(before) if higher else now < min(before))",
        "return not before or (now >= max(before) if higher else now <= min(before))",
        "checkpoints/best.pt moves on to a later epoch that only ties the best validation metric",
        ("tests/test_best_checkpoint.py",),
    ),
]


@dataclass
class Result:
    mutation: Optional[Mutation]
    status: str  # caught, survived, error, passed (baseline), broken (baseline)
    seconds: float
    detail: str = ""


def problems(mutations: Sequence[Mutation], root: Path = ROOT) -> List[str]:
    """Why each mutation could not be applied to the tree at ``root`` (empty: all apply).

    The original text must occur exactly once, differ from its replacement, and every test file
    a mutation names must exist.
    """
    out = []
    names = [m.name for m in mutations]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        out.append(f"mutation name {dup!r} is used more than once")
    for m in mutations:
        path = root / m.path
        if not path.is_file():
            out.append(f"{m.name}: {m.path} does not exist (moved?); update the mutation list")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            out.append(f"{m.name}: the original text occurs {count} times in {m.path}, not once; "
                       f"update the mutation list: {m.original!r}")
        if m.original == m.replacement:
            out.append(f"{m.name}: the replacement equals the original")
        if not m.tests:
            out.append(f"{m.name}: names no tests")
        for t in m.tests:
            file = t.split("::")[0]
            if not (root / file).is_file():
                out.append(f"{m.name}: test file {file} does not exist")
            elif "::" in t:
                func = t.split("::")[1].split("[")[0]
                if f"def {func}(" not in (root / file).read_text():
                    out.append(f"{m.name}: {file} has no test {func}")
    return out


def scratch_copy(root: Path, dest: Path) -> Path:
    """The parts of the repository the tests need, copied to ``dest``; conf/ also as msnet/conf."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    # An editable install maps msnet.conf to its own checkout's conf/; a package folder inside the
    # copy's msnet/ is found first, so the copy runs with its own configs.
    shutil.copytree(root / "conf", dest / "msnet" / "conf", ignore=IGNORED, dirs_exist_ok=True)
    return dest


def run_tests(workdir: Path, tests: Sequence[str], timeout: float) -> Tuple[int, str, float]:
    """``(exit code, last output lines, seconds)`` of pytest on ``tests`` inside ``workdir``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(workdir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, "\n".join(lines[-15:]), time.perf_counter() - t0


def summary_line(output: str) -> str:
    """pytest's last line (``1 failed, 3 passed in 2.1s``), or the last line there is."""
    lines = output.splitlines()
    return lines[-1].strip("= ") if lines else ""


def check_mutation(m: Mutation, root: Path, tmp: Path, timeout: float) -> Result:
    work = scratch_copy(root, tmp / m.name)
    try:
        target = work / m.path
        target.write_text(target.read_text().replace(m.original, m.replacement, 1))
        rc, out, seconds = run_tests(work, m.tests, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rc == 1:
        return Result(m, "caught", seconds, summary_line(out))
    if rc == 0:
        return Result(m, "survived", seconds, summary_line(out))
    # 2: collection error or interrupted, 4: usage error, 5: no tests collected, -1: timeout
    return Result(m, "error", seconds, f"pytest exit code {rc}: {out}")


def baseline(mutations: Sequence[Mutation], root: Path, tmp: Path, timeout: float) -> Result:
    tests = sorted({t for m in mutations for t in m.tests})
    work = scratch_copy(root, tmp / "baseline")
    try:
        rc, out, seconds = run_tests(work, tests, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Result(None, "passed" if rc == 0 else "broken", seconds, summary_line(out) if rc == 0 else out)


def print_table(results: Sequence[Result]) -> None:
    rows = [(r.mutation.name, r.mutation.path, r.status, f"{r.seconds:.1f}", r.mutation.description,
             r.detail.splitlines()[0] if r.detail else "") for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title="mutation check")
    for col in ("mutation", "file", "result", "s", "planted bug", "pytest"):
        table.add_column(col, overflow="fold")
    style = {"caught": "green", "survived": "bold red", "error": "bold red"}
    for row in rows:
        table.add_row(*row[:2], f"[{style[row[2]]}]{row[2]}[/]", *row[3:])
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


def select(mutations: Sequence[Mutation], patterns: Optional[Sequence[str]]) -> List[Mutation]:
    if not patterns:
        return list(mutations)
    return [m for m in mutations if any(p.lower() in (m.name + " " + m.description).lower() for p in patterns)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("-k", action="append", metavar="SUBSTR",
                        help="only mutations whose name or description contains SUBSTR (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)

    chosen = select(MUTATIONS, args.k)
    if not chosen:
        print(f"no mutation matches {args.k}")
        return 1
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.description}\n    {m.original!r}\n -> {m.replacement!r}\n"
                  f"    tests: {' '.join(m.tests)}")
        return 0
    bad = problems(chosen)
    if bad:
        print("cannot apply the mutation list to this tree:")
        for line in bad:
            print("  " + line)
        return 1

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msnet-mutation-") as tmp:
        base = baseline(chosen, ROOT, Path(tmp), args.timeout)
        print(f"baseline (unmutated, {len({t for m in chosen for t in m.tests})} test selections): "
              f"{base.status} in {base.seconds:.1f} s  {base.detail if base.status == 'passed' else ''}")
        if base.status != "passed":
            print("broken baseline: the selected tests fail without any mutation, so nothing was mutated")
            print(base.detail)
            return 1
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda m: check_mutation(m, ROOT, Path(tmp), args.timeout), chosen))
    print_table(results)
    for r in results:
        if r.status == "error":
            print(f"{r.mutation.name}: {r.detail}")
    caught = sum(r.status == "caught" for r in results)
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"{caught}/{len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
