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
        "reversible-undo", "msnet/core/schemes.py",
        "old = torch.sub(old, v, alpha=c)",
        "old = torch.add(old, v, alpha=c)",
        "reversible inverse sub-step adds the F term instead of subtracting it",
        ("tests/test_reversible.py::test_inverse_steps_rebuild_every_state",),
    ),
    Mutation(
        "reversible-backprop-beta", "msnet/core/schemes.py",
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
        "gauss-newton-hessian", "msnet/methods/newton.py",
        "return (pu - probs * pu.sum(dim=1, keepdim=True)) / probs.shape[0]",
        "return pu / probs.shape[0]",
        "cross-entropy Hessian in logit space without its rank-one term (diag(p) instead of diag(p) - p p^T)",
        ("tests/test_bcd.py::test_gauss_newton_product_equals_explicit_jacobians",),
    ),
    Mutation(
        "newton-forcing-term", "msnet/methods/newton.py",
        "cg = conjugate_gradient(apply, [-gi for gi in g], cg_iters, rtol=min(0.5, gnorm))",
        "cg = conjugate_gradient(apply, [-gi for gi in g], cg_iters, rtol=0.5)",
        "Newton-CG with a fixed CG tolerance 1/2 instead of min(1/2, ||g||): linear, not quadratic, convergence",
        ("tests/test_bcd.py::test_newton_cg_on_the_classifier_converges_quadratically_to_the_lbfgs_optimum",),
    ),
    Mutation(
        "bcd-stale-features", "msnet/methods/bcd.py",
        'feats1 = trial["feats"] if a > 0 else feats0',
        "feats1 = feats0",
        "BCD's classifier block solves on the features from before the propagation step",
        ("tests/test_bcd.py::test_bcd_iteration_is_monotone_and_both_blocks_move",),
    ),
    Mutation(
        "mgopt-coherence", "msnet/methods/hierarchy.py",
        "coarse.tau = [a - move(tr.G, st, b) for a, b, st in zip(gc, g, fine.stage)]",
        "coarse.tau = [a - move(tr.R, st, b) for a, b, st in zip(gc, g, fine.stage)]",
        "the coherence term MG/OPT and RMTR share (hierarchy.couple_coarse) restricts the fine gradient with R "
        "(injection) instead of P^T",
        ("tests/test_mgopt.py::test_first_order_coherence_on_every_level",
         "tests/test_rmtr.py::test_first_order_coherence_on_every_level"),
    ),
    Mutation(
        "rmtr-room", "msnet/methods/rmtr.py",
        "                step_radius = min(step_radius, left / self.p_norm[i + 1])",
        "                step_radius = min(step_radius, left)",
        "RMTR's coarse steps forget that P can lengthen them (||P s_c|| <= ||P|| ||s_c||): the prolonged step may "
        "leave the fine trust region",
        ("tests/test_rmtr.py::test_prolonged_coarse_step_respects_the_fine_radius",),
    ),
    Mutation(
        "rmtr-radius-shrink", "msnet/methods/rmtr.py",
        "        return s.gamma1 * step_radius",
        "        return s.gamma1 * radius",
        "RMTR shrinks a rejected step's level radius instead of the step's own (room-limited) radius",
        ("tests/test_rmtr.py::test_radius_rules",),
    ),
    Mutation(
        "mgopt-rejected-correction-kept", "msnet/methods/mgopt.py",
        "        for p, a in zip(lv.params, x0):\n            p.copy_(a)\n        return 0.0, None",
        "        return 0.0, None",
        "MG/OPT keeps the last trial of a correction its line search rejected",
        ("tests/test_mgopt.py::test_armijo_correction_is_checked_outside_the_cycle",),
    ),
    Mutation(
        "mgopt-correction", "msnet/methods/mgopt.py",
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
        "return min(values[-patience:]) >= min(values[:-patience]) - min_delta",
        "return min(values[-patience:]) >= min(values[:-patience]) + min_delta",
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
    # --- resume under every source of randomness; checkpoint, early-stop and schedule boundaries --------
    Mutation(
        "resume-reseeds-global-rng", "msnet/training/state.py",
        '        restore_rng(ckpt["rng"], state.generator)\n',
        '        restore_rng(ckpt["rng"], state.generator)\n        torch.manual_seed(int(cfg.seed))\n',
        "a resume reseeds the global torch RNG after restoring it: stochastic depth redraws the first epoch's gates",
        ("tests/test_resume_randomness.py::test_resume_with_every_source_of_randomness_equals_the_uninterrupted_run",),
    ),
    Mutation(
        "resume-keeps-the-seeds-torch-rng", "msnet/training/state.py",
        '    torch.set_rng_state(state["torch"])\n',
        "",
        "a resume restores the data order and CUDA's RNG but not the global torch RNG (as if restored before the "
        "seeded rebuild of the network)",
        ("tests/test_resume_randomness.py::test_resume_with_every_source_of_randomness_equals_the_uninterrupted_run",),
    ),
    Mutation(
        "resume-keeps-the-seeds-data-order", "msnet/training/state.py",
        '    generator.set_state(state["data"])\n',
        "",
        "a resume forgets the data-order generator's state: the epochs after it shuffle as the first ones did",
        ("tests/test_resume_randomness.py::test_resume_with_every_source_of_randomness_equals_the_uninterrupted_run",),
    ),
    Mutation(
        "ddp-resume-restarts-rank-streams", "msnet/training/api.py",
        'distributed.seed_rank(int(cfg.seed), env, (ckpt or {}).get("rng", {}).get("ranks"))',
        "distributed.seed_rank(int(cfg.seed), env)",
        "a DDP resume reseeds rank r > 0 with seed + r: it repeats its first epochs' stochastic-depth gates",
        ("tests/test_resume_randomness.py::test_two_ranks_resume_with_stochastic_depth_equals_the_uninterrupted_run",),
    ),
    Mutation(
        "ddp-resume-gives-rank0s-stream", "msnet/training/distributed.py",
        'torch.set_rng_state(saved[env.rank]["torch"])',
        'torch.set_rng_state(saved[0]["torch"])',
        "a DDP resume gives every rank rank 0's saved RNG stream instead of its own",
        ("tests/test_resume_randomness.py::test_two_ranks_resume_with_stochastic_depth_equals_the_uninterrupted_run",),
    ),
    Mutation(
        "carry-best-drops-the-resumed-epochs", "msnet/training/state.py",
        'if int(load_checkpoint(previous)["epoch"]) > epoch:',
        'if int(load_checkpoint(previous)["epoch"]) >= epoch:',
        "a resume from last.pt of best.pt's epoch does not carry best.pt (that epoch is never trained again)",
        ("tests/test_checkpoint_boundaries.py::test_resume_and_extension_from_the_epoch_best_pt_holds",),
    ),
    Mutation(
        "plateau-at-the-last-epoch-stops-early", "msnet/training/state.py",
        "        return (self.level_epoch < schedule[self.level_index].epochs\n"
        "                and schedule.ends_early(self.level_index, self.level_rows()))",
        "        return schedule.ends_early(self.level_index, self.level_rows())",
        "a plateau at the last scheduled epoch counts as an early stop (stopped_early, ended: plateau)",
        ("tests/test_checkpoint_boundaries.py::test_a_plateau_at_the_last_scheduled_epoch_is_not_an_early_stop",),
    ),
    Mutation(
        "resume-level-epoch-from-run-epoch", "msnet/training/state.py",
        'state.level_epoch = int(ckpt.get("level_epoch", ckpt["epoch"]))',
        'state.level_epoch = int(ckpt.get("epoch", ckpt["level_epoch"]))',
        "a resume takes the epochs of the whole run as the epochs done in the checkpoint's level",
        ("tests/test_checkpoint_boundaries.py::test_resume_at_a_level_boundary",),
    ),
    Mutation(
        "checkpoint-every-skips-level-ends", "msnet/training/api.py",
        "if state.level_epoch % cfg.trainer.checkpoint_every == 0 or state.finished(schedule):",
        "if state.level_epoch % cfg.trainer.checkpoint_every == 0:",
        "trainer.checkpoint_every skips last.pt at a level's end (the run's last epoch, an early stop) off its period",
        ("tests/test_checkpoint_boundaries.py::test_checkpoint_every_still_writes_the_final_and_level_end_epochs",),
    ),
    Mutation(
        "extension-repeats-the-level-summary", "msnet/training/state.py",
        "state.level_summaries = levels if state.finished(schedule) else levels[: state.level_index]",
        "state.level_summaries = levels",
        "an extended run (resume=... trainer.epochs=N) keeps the finished level's old summary beside its new one",
        ("tests/test_checkpoint_boundaries.py::test_the_final_epochs_checkpoint_is_finished_and_extends",),
    ),
    # --- operators against independent oracles (multigrid/, data/) --------------------------------------
    Mutation(
        "blur-kernel-narrow", "msnet/multigrid/network.py",
        "k = torch.exp(-0.5 * (t / sigma) ** 2)",
        "k = torch.exp(-(t / sigma) ** 2)",
        "Gaussian smoothing with std sigma / sqrt(2) (still normalised, so constants are kept)",
        ("tests/test_operator_oracles.py::test_gaussian_blur_moments",
         "tests/test_operator_oracles.py::test_gaussian_blur_is_the_hand_built_truncated_gaussian"),
    ),
    Mutation(
        "blur-radius-2-sigma", "msnet/multigrid/network.py",
        "radius = max(1, int(round(3 * sigma)))",
        "radius = max(1, int(round(2 * sigma)))",
        "Gaussian truncated at 2 sigma instead of the stated 3 sigma (renormalised: constants kept)",
        ("tests/test_operator_oracles.py::test_gaussian_blur_is_the_hand_built_truncated_gaussian",),
    ),
    Mutation(
        "blur-reflect-edges", "msnet/multigrid/network.py",
        'mode="replicate"',
        'mode="reflect"',
        "smoothing pads by reflection instead of replicating the edge pixel (constants still kept)",
        ("tests/test_operator_oracles.py::test_gaussian_blur_is_the_hand_built_truncated_gaussian",),
    ),
    Mutation(
        "restrict-images-blur-after-r", "msnet/multigrid/network.py",
        "        if sigma > 0:\n            x = gaussian_blur(x, sigma)\n        x = transfer.restrict(x)",
        "        x = transfer.restrict(x)\n        if sigma > 0:\n            x = gaussian_blur(x, sigma)",
        "coarse images smoothed after restriction instead of before (sigma then counts coarse pixels)",
        ("tests/test_operator_oracles.py::test_restrict_images_is_blur_then_r_on_each_level",),
    ),
    Mutation(
        "resample-no-antialias", "msnet/multigrid/network.py",
        "antialias = size[0] < x.shape[-2]",
        "antialias = False",
        "the bilinear resampling baseline downsamples without its antialiasing filter (aliases)",
        ("tests/test_operator_oracles.py::test_resample_images_is_half_pixel_bilinear",),
    ),
    Mutation(
        "full-weighting-kernel", "msnet/multigrid/space.py",
        "_w = torch.tensor([1.0, 2.0, 1.0])",
        "_w = torch.tensor([1.0, 6.0, 1.0]) / 2",
        "linear pair with (1, 6, 1)/8 weights: R still sums to 1 and R = P^T / 4 still holds, but it is not bilinear",
        ("tests/test_operator_oracles.py::test_transfer_pair_is_the_hand_built_dense_operator",
         "tests/test_operator_oracles.py::test_galerkin_stencil_is_the_dense_product_r_a_p"),
    ),
    Mutation(
        "block-restriction-injection", "msnet/multigrid/space.py",
        "return F.avg_pool2d(y, 2)",
        "return y[..., ::2, ::2].clone()",
        "block pair restricts by injection (top-left pixel of each block): R P = I still holds, R != P^T / 4",
        ("tests/test_operator_oracles.py::test_transfer_pair_is_the_hand_built_dense_operator",),
    ),
    Mutation(
        "time-prolong-integer-ratio", "msnet/multigrid/time.py",
        "pos = torch.arange(m, dtype=torch.float64) * n / m",
        "pos = torch.arange(m, dtype=torch.float64) / (m // n)",
        "linear prolongation in time assumes M is a multiple of N (right for doubling, wrong for 3 -> 4 steps)",
        ("tests/test_operator_oracles.py::test_time_prolongations_match_exact_interpolation_for_every_depth",),
    ),
    Mutation(
        "level-data-test-default-sigma", "msnet/multigrid/levels.py",
        "x_test=restrict_images(data.x_test, down, op, sigma),",
        "x_test=restrict_images(data.x_test, down, op),",
        "the test split is restricted with the default smoothing, not the level's (sigma=0 pyramids)",
        ("tests/test_operator_oracles.py::test_level_data_restricts_every_split_alike",),
    ),
    Mutation(
        "data-for-size-defaults", "msnet/multigrid/levels.py",
        "return level_data(data, k, op, sigma)",
        "return level_data(data, k)",
        "evaluate/transfer restrict a checkpoint's data with the default operator, not the run's pyramid's",
        ("tests/test_operator_oracles.py::test_data_for_size_uses_the_runs_operator_and_smoothing",),
    ),
    Mutation(
        "normalise-std-with-val", "msnet/data/memory.py",
        "std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)",
        "std = (raw.x_train.to(dtype) / 255.0).std(dim=(0, 2, 3)).clamp_min(1e-6)",
        "normalisation std computed on train + validation images (the validation split leaks into it)",
        ("tests/test_operator_oracles.py::test_normalisation_uses_train_statistics_only_per_channel",),
    ),
    Mutation(
        "normalise-mean-with-test", "msnet/data/memory.py",
        "mean = x_tr.mean(dim=(0, 2, 3))",
        "mean = torch.cat([x_tr, x_test.to(dtype) / 255.0]).mean(dim=(0, 2, 3))",
        "normalisation mean computed on train + test images",
        ("tests/test_operator_oracles.py::test_normalisation_uses_train_statistics_only_per_channel",),
    ),
    Mutation(
        "nchw-transposed", "msnet/data/sources.py",
        "t = t.permute(0, 3, 1, 2)",
        "t = t.permute(0, 3, 2, 1)",
        "(n, H, W, C) images become (n, C, W, H): every square colour image is transposed",
        ("tests/test_operator_oracles.py::test_npz_colour_images_keep_their_pixel_order",),
    ),
    # --- what a method trains with: lr per epoch and level, accumulations over chunks and ranks ----------
    Mutation(
        "lr-scheduler-stepped-twice", "msnet/methods/first_order.py",
        "        if self.scheduler is not None:\n            self.scheduler.step()",
        "        if self.scheduler is not None:\n            self.scheduler.step()\n            self.scheduler.step()",
        "a first-order rule steps its learning-rate schedule twice per epoch",
        ("tests/test_learning_rates.py::test_first_order_trains_with_torchs_schedule",),
    ),
    Mutation(
        "lr-recorded-after-the-epoch", "msnet/training/fit.py",
        '"lr": lr,',
        '"lr": rule.lr,',
        "metrics.jsonl records the next epoch's learning rate (read after the scheduler stepped), not the one trained with",
        ("tests/test_learning_rates.py::test_first_order_trains_with_torchs_schedule",),
    ),
    Mutation(
        "cosine-tmax-off-by-one", "msnet/methods/first_order.py",
        "T_max=max(1, epochs)",
        "T_max=max(1, epochs - 1)",
        "the cosine schedule anneals over one epoch fewer than the level's (reaching lr 0 in its last epoch)",
        ("tests/test_learning_rates.py::test_first_order_trains_with_torchs_schedule",),
    ),
    Mutation(
        "mgopt-coarse-lr-factor-dropped", "msnet/methods/mgopt.py",
        'cfg_i = opt_cfg if finest else OmegaConf.merge(opt_cfg, {"lr": lr_i})',
        "cfg_i = opt_cfg",
        "MG/OPT's coarse smoothers train at optimizer.lr, ignoring trainer.coarse_lr_factor",
        ("tests/test_learning_rates.py::test_mgopt_smoothers_train_with_the_factor_under_the_same_schedule",),
    ),
    Mutation(
        "mgopt-coarse-schedule-frozen", "msnet/methods/mgopt.py",
        "        for lv in self.levels:\n            if lv.scheduler is not None:\n                lv.scheduler.step()",
        "        for lv in self.levels[-1:]:\n            if lv.scheduler is not None:\n                lv.scheduler.step()",
        "only MG/OPT's finest smoother follows the schedule; the coarse ones stay at their initial rate",
        ("tests/test_learning_rates.py::test_mgopt_smoothers_train_with_the_factor_under_the_same_schedule",),
    ),
    Mutation(
        "level-lr-ignored", "msnet/training/fit.py",
        'opt_cfg = cfg.optimizer if level.lr is None else OmegaConf.merge(cfg.optimizer, {"lr": level.lr})',
        "opt_cfg = cfg.optimizer",
        "schedule levels train at optimizer.lr, ignoring depth.lr / pyramid.lr",
        ("tests/test_learning_rates.py::test_depth_levels_restart_the_schedule_from_their_rate",),
    ),
    Mutation(
        "level-schedule-over-run-epochs", "msnet/training/fit.py",
        "rule = build_update(state.model, cfg, opt_cfg, level.epochs, penalty)",
        "rule = build_update(state.model, cfg, opt_cfg, cfg.trainer.epochs, penalty)",
        "a schedule level's learning-rate schedule runs over trainer.epochs instead of the level's epochs",
        ("tests/test_learning_rates.py::test_depth_levels_restart_the_schedule_from_their_rate",
         "tests/test_learning_rates.py::test_pyramid_levels_restart_from_their_rate_and_a_plateau_keeps_the_scheduled_length"),
    ),
    Mutation(
        "bcd-first-trial-step-fixed", "msnet/methods/bcd.py",
        "f0, slope, s.lr, s.armijo_c1",
        "f0, slope, 1.0, s.armijo_c1",
        "BCD's propagation line search starts at 1 whatever optimizer.lr (or the level's lr) says",
        ("tests/test_learning_rates.py::test_bcd_lr_is_the_first_trial_step_of_every_line_search",),
    ),
    Mutation(
        "rmtr-coarse-radius-unscaled", "msnet/methods/rmtr.py",
        "coarse.radius = step_radius / self.p_norm[i]",
        "coarse.radius = step_radius",
        "an RMTR coarse solve starts at the fine room instead of room / ||P||_2",
        ("tests/test_learning_rates.py::test_rmtr_has_no_lr_and_its_radius_starts_where_the_docs_say",),
    ),
    Mutation(
        "eval-chunk-weighted-as-full", "msnet/training/evaluation.py",
        'loss_sum += F.cross_entropy(logits, yb, reduction="sum")',
        "loss_sum += F.cross_entropy(logits, yb) * batch_size",
        "evaluation weights every eval_batch_size chunk as a full one (the last, smaller chunk over-counted)",
        ("tests/test_accumulation.py::test_evaluation_over_chunks_equals_one_pass",),
    ),
    Mutation(
        "epoch-last-batch-counted-full", "msnet/training/loop.py",
        "seen += yb.shape[0]",
        "seen += batch_size",
        "an epoch counts its last, smaller mini-batch as a full one (mean loss and accuracy too small)",
        ("tests/test_accumulation.py::test_an_epoch_weights_its_batches_by_count",),
    ),
    Mutation(
        "epoch-chunks-unweighted", "msnet/training/fit.py",
        "loss, acc = loss + result.loss * result.samples, acc + result.acc * result.samples",
        "loss, acc = loss + result.loss * n_train / len(parts), acc + result.acc * n_train / len(parts)",
        "evals_per_epoch > 1: the epoch's loss is the mean of its chunks' means, not weighted by their counts",
        ("tests/test_accumulation.py::test_chunked_epochs_weight_chunks_by_count",),
    ),
    Mutation(
        "epoch-chunk-remainder-dropped", "msnet/training/fit.py",
        "return list(torch.randperm(n_train, generator=generator)[:m].chunk(evals_per_epoch))",
        "return list(torch.randperm(n_train, generator=generator)[:m - m % evals_per_epoch].chunk(evals_per_epoch))",
        "evals_per_epoch > 1: the images that do not divide evenly into the chunks are never trained on",
        ("tests/test_accumulation.py::test_chunked_epochs_weight_chunks_by_count",),
    ),
    Mutation(
        "stencil-fit-last-chunk-dropped", "msnet/multigrid/datafit.py",
        "for i in range(0, y.shape[0], chunk):",
        "for i in range(0, y.shape[0] - chunk + 1, chunk):",
        "the stencil fit's normal equations leave out the last, partial chunk of images",
        ("tests/test_accumulation.py::test_stencil_fit_normal_equations_over_chunks_equal_one_chunk",),
    ),
    Mutation(
        "gauss-newton-mean-over-classes", "msnet/methods/newton.py",
        "return (pu - probs * pu.sum(dim=1, keepdim=True)) / probs.shape[0]",
        "return (pu - probs * pu.sum(dim=1, keepdim=True)) / probs.shape[1]",
        "the cross-entropy Hessian product divides by the number of classes instead of the batch",
        ("tests/test_accumulation.py::test_gauss_newton_product_is_the_count_weighted_mean_over_chunks",),
    ),
    Mutation(
        "ddp-loss-weight-one", "msnet/training/distributed.py",
        "return xb[start:stop], yb[start:stop], self.world_size * (stop - start) / yb.shape[0]",
        "return xb[start:stop], yb[start:stop], 1.0",
        "DDP weights every rank 1/K in the gradient average instead of n_r / n (unequal shards)",
        ("tests/test_accumulation.py::test_two_ranks_with_unequal_shards_equal_one_process",),
    ),
    Mutation(
        "ddp-epoch-sums-not-reduced", "msnet/training/loop.py",
        "totals = shard.sum(torch.tensor(totals, dtype=torch.float64, device=loss_sum.device)).tolist()",
        "totals = totals",
        "under DDP each rank reports its own shard's loss, accuracy and count, not the all-reduced global ones",
        ("tests/test_accumulation.py::test_two_ranks_with_unequal_shards_equal_one_process",),
    ),
    # --- the monitored metric, saved configs on today's schema, unknown keys ------------------------------
    Mutation(
        "plateau-accuracy-direction", "msnet/training/schedule.py",
        "return max(values[-patience:]) <= max(values[:-patience]) + min_delta",
        "return max(values[-patience:]) <= max(values[:-patience]) - min_delta",
        "an accuracy plateau asks a rise of more than min_delta below the best (the loss rule's sign)",
        ("tests/test_level_patience.py",),
    ),
    Mutation(
        "monitor-ignores-objective", "msnet/config.py",
        'return ("val_acc", True) if self.value.endswith("_acc") else ("val_loss", False)',
        'return ("val_loss", False)',
        "early stopping and best.pt watch the validation loss whatever trainer.objective says",
        ("tests/test_level_patience.py::test_the_objective_drives_early_stopping_and_best_pt_alike",),
    ),
    Mutation(
        "upgrade-ignores-option-schema", "msnet/config.py",
        "named = GROUP_SCHEMAS.get((key, str(value.get(\"name\"))))",
        "named = None",
        "an old trainer=mgopt config is upgraded on TrainerConfig, so MG/OPT's settings it lacks stay missing",
        ("tests/test_old_checkpoints.py",),
    ),
    Mutation(
        "unknown-keys-accepted", "msnet/config.py",
        "if known is not None and key not in known:",
        "if known is not None and key not in known and key.startswith('_'):",
        "+trainer.foo=1 is accepted and silently ignored again",
        ("tests/test_trust.py",),
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
