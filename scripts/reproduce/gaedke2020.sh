#!/usr/bin/env bash
# Gaedke-Merzhäuser, Kopaničáková, Krause, "Multilevel minimization for deep residual networks"
# (2020): single-level training against MG/OPT multilevel training (msnet train trainer=mgopt) of
# the same deep ODE-ResNet with the same smoother (Adam, constant learning rate), same data and
# seed. Validation accuracy against work (fine-gradient equivalents) and training time, and the
# speedup to the single-level plateau minus 0.5 points, beside the paper's claim (> 3x).
# Writes gaedke2020.png, table.md and table.json into the output folder.
#
#   scripts/reproduce/gaedke2020.sh            # default: Fashion-MNIST, 5,000 training images, 32 layers x 8
#                                              #   channels, single 16 epochs, MG/OPT 3 levels 8 epochs
#                                              #   (estimated ~20 min on 2 CPU cores; not timed end to end)
#   scripts/reproduce/gaedke2020.sh --quick    # 16 layers x 4 channels, 2,560 images: a few minutes
#   scripts/reproduce/gaedke2020.sh --full     # 64 layers x 16 channels, the full training set (hours on a CPU)
#   scripts/reproduce/gaedke2020.sh dataset=mnist              # other datasets: extra overrides go to both runs
#   scripts/reproduce/gaedke2020.sh trainer.coarse_steps=8     # ... also MG/OPT settings (the single run ignores them)
source "$(dirname "$0")/_common.sh"
shift "$SHIFT"
OUT=${OUT:-outputs/reproduce/gaedke2020/$(date +%Y-%m-%d_%H-%M-%S)}

# Short epochs (train_subset) give a validation point every few dozen mini-batches; both runs use
# a constant learning rate, so that neither run's schedule depends on its own epoch budget.
case $MODE in
  quick)   L=16; C=4;  SINGLE=6;  MG=3; DATA="dataset.train_subset=2560 dataset.val_size=1000 dataset.test_subset=1000" ;;
  default) L=32; C=8;  SINGLE=16; MG=8; DATA="dataset.train_subset=5000 dataset.val_size=2000 dataset.test_subset=2000" ;;
  full)    L=64; C=16; SINGLE=20; MG=10; DATA="dataset.val_size=5000" ;;
esac
COMMON="model.layers=$L model.channels=$C optimizer=adam optimizer.lr=2e-3 optimizer.scheduler=constant
        trainer.eval_at_start=true trainer.progress=false $DATA"
# The MG/OPT cycle of scripts/bench/bench_mgopt.py's defaults: 3 levels (L/4, L/2, L steps), no fine smoothing,
# 4 Adam steps on the coarsest level per mini-batch.
MGOPT="trainer=mgopt trainer.levels=3 trainer.cycle=V trainer.nu1=0 trainer.nu2=0 trainer.coarse_steps=4
       trainer.cycle_loss=false"
EXTRA=("$@")
mkdir -p "$OUT"
echo "reproduce_gaedke2020: mode $MODE, $L layers x $C channels, single $SINGLE epochs, MG/OPT $MG epochs, output $OUT"

echo "single-level (log: $OUT/single.log)"
# shellcheck disable=SC2086
"$MSNET" train $COMMON trainer.epochs=$SINGLE "${EXTRA[@]}" hydra.run.dir="$OUT/single" \
  > "$OUT/single.log" 2>&1 || { tail -5 "$OUT/single.log"; exit 1; }
echo "MG/OPT (log: $OUT/mgopt.log)"
# shellcheck disable=SC2086
"$MSNET" train $COMMON $MGOPT trainer.epochs=$MG "${EXTRA[@]}" hydra.run.dir="$OUT/mgopt" \
  > "$OUT/mgopt.log" 2>&1 || { tail -5 "$OUT/mgopt.log"; exit 1; }

"$PY" scripts/reproduce/gaedke2020_figure.py "$OUT"
