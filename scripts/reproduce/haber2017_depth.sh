#!/usr/bin/env bash
# Haber, Ruthotto, Holtham, Jun, "Learning across scales" (AAAI 2018), Fig. 2: shallow-to-deep
# training. For each depth 2, 4, ..., STOP (T kept, h = T/N), validation accuracy and loss
# against iterations, for the multiscale initialisation (the previous depth's network
# prolonged linearly in time: msnet train +depth=doubling) and for a random initialisation
# (msnet train model.layers=N). Writes fig2_depth.png and table.md into the output folder.
#
#   scripts/reproduce/haber2017_depth.sh           # default: depths 2..32, ~20 min on 2 CPU cores
#   scripts/reproduce/haber2017_depth.sh --quick   # depths 2..8, a few minutes
#   scripts/reproduce/haber2017_depth.sh --full    # the paper's 2..64, full training set (hours)
#   scripts/reproduce/haber2017_depth.sh dataset=mnist   # extra overrides go to every run
#   OPTIMIZER=bcd scripts/reproduce/haber2017_depth.sh   # the paper's optimizer (any mode): every run gets
#       optimizer=bcd and trainer.batch_size=$BCD_BATCH (default: a quarter of the training images, so
#       4 BCD iterations per epoch, 24 per depth by default, like the paper's 20); output in .../haber2017_depth_bcd/
source "$(dirname "$0")/_common.sh"
shift "$SHIFT"
OPTIMIZER=${OPTIMIZER:-}
OUT=${OUT:-outputs/reproduce/haber2017_depth${OPTIMIZER:+_$OPTIMIZER}/$(date +%Y-%m-%d_%H-%M-%S)}

# One "iteration" is one mini-batch of 128; epochs are kept short (train_subset) so that each
# depth gets several validation points, as the paper's 20 BCD iterations per depth do.
case $MODE in
  quick)   STOP=8;  EPOCHS=3; DATA="dataset.train_subset=2560 dataset.val_size=1000" ;;
  default) STOP=32; EPOCHS=6; DATA="dataset.train_subset=3200 dataset.val_size=2000" ;;
  full)    STOP=64; EPOCHS=20; DATA="dataset.val_size=10000" ;;
esac
case $OPTIMIZER in
  "")  OPT_ARGS="" ;;
  bcd) case $MODE in quick) B=640 ;; default) B=800 ;; full) B=1024 ;; esac
       OPT_ARGS="optimizer=bcd trainer.batch_size=${BCD_BATCH:-$B}" ;;
  *)   OPT_ARGS="optimizer=$OPTIMIZER" ;;
esac
COMMON="model.channels=8 $OPT_ARGS optimizer.scheduler=constant trainer.eval_at_start=true trainer.progress=false $DATA"
DEPTHS=$("$PY" -c "d=[2]
while d[-1] < $STOP: d.append(2 * d[-1])
print(','.join(map(str, d)))")
EXTRA=("$@")
mkdir -p "$OUT"
echo "reproduce_haber2017_depth: mode $MODE, depths $DEPTHS, $EPOCHS epochs each, ${OPT_ARGS:-default optimizer}, output $OUT"

echo "multiscale initialisation: +depth=doubling (log: $OUT/multiscale.log)"
# shellcheck disable=SC2086
"$MSNET" train +depth=doubling depth.start=2 depth.stop=$STOP "depth.epochs=[$EPOCHS]" $COMMON "${EXTRA[@]}" \
  hydra.run.dir="$OUT/multiscale" > "$OUT/multiscale.log" 2>&1 || { tail -5 "$OUT/multiscale.log"; exit 1; }
echo "random initialisation: model.layers=$DEPTHS (log: $OUT/random.log)"
# shellcheck disable=SC2086
"$MSNET" train -m model.layers=$DEPTHS trainer.epochs=$EPOCHS $COMMON "${EXTRA[@]}" \
  hydra.sweep.dir="$OUT/random" > "$OUT/random.log" 2>&1 || { tail -5 "$OUT/random.log"; exit 1; }

"$PY" scripts/reproduce/depth_figure.py "$OUT"
