#!/usr/bin/env bash
# Haber, Ruthotto, Holtham, Jun, "Learning across scales" (AAAI 2018), Sec. 4, "Classification
# across resolutions": train a coarse (14x14) and a fine (28x28) network, then classify each
# resolution with the other's network moved by stencil transfer, by naive kernel reuse, and by
# resampling the images; print the paper's numbers beside msnet's.
#
# A sweep over depth (model.layers) and final time (model.T) (--full adds the classifier-smoothness
# regulariser; GRID= sets any sweep) shows where stencil transfer keeps accuracy; the headline setting is chosen on
# VALIDATION accuracy of the coarse->fine stencil transfer, and its test numbers are reported.
#
#   scripts/reproduce/haber2017_resolution.sh            # default: 10000 images, 4 settings, ~10 min on 2 CPU cores
#   scripts/reproduce/haber2017_resolution.sh --quick    # ~3 min smoke run (5000 images, 2 settings)
#   GRID="model.layers=2 model.activation=tanh,relu" scripts/reproduce/haber2017_resolution.sh   # your own sweep
#   scripts/reproduce/haber2017_resolution.sh --full     # all 55000 images, 16 channels, 10 epochs (hours)
#   scripts/reproduce/haber2017_resolution.sh dataset=mnist   # extra overrides go to every run
#   OPTIMIZER=bcd scripts/reproduce/haber2017_resolution.sh   # the paper's optimizer (any mode): every run gets
#       experiment=bcd_fashion (BCD, batch 1024, ||grad W||^2 1e-7; BCD_BATCH=... changes the batch);
#       output in .../haber2017_resolution_bcd/
# Output: $OUT (default outputs/reproduce/haber2017_resolution/DATE) with every run, and
# table.md / table.json there.
source "$(dirname "$0")/_common.sh"
shift "$SHIFT"
OPTIMIZER=${OPTIMIZER:-}
OUT=${OUT:-outputs/reproduce/haber2017_resolution${OPTIMIZER:+_$OPTIMIZER}/$(date +%Y-%m-%d_%H-%M-%S)}
case $OPTIMIZER in
  "")  OPT_ARGS="" ;;
  bcd) OPT_ARGS="experiment=bcd_fashion trainer.batch_size=${BCD_BATCH:-1024}" ;;
  *)   OPT_ARGS="optimizer=$OPTIMIZER" ;;
esac

case $MODE in
  quick)   COMMON="dataset.train_subset=5000 model.channels=8 trainer.epochs=2"; GRID_DEFAULT="model.layers=2 model.T=1,4" ;;
  default) COMMON="dataset.train_subset=10000 model.channels=8 trainer.epochs=3"; GRID_DEFAULT="model.layers=2,4 model.T=1,4" ;;
  full)    COMMON="model.channels=16 trainer.epochs=10"; GRID_DEFAULT="model.layers=2,4 model.T=1,4 regularizer.classifier_smoothness=0,1e-6" ;;
esac
# The swept settings; e.g. GRID="model.layers=2 model.activation=tanh,relu regularizer.classifier_smoothness=0,1e-6"
GRID=${GRID:-$GRID_DEFAULT}
EXTRA=("$@")
echo "reproduce_haber2017_resolution: mode $MODE, ${OPT_ARGS:-default optimizer}, output $OUT"

mkdir -p "$OUT"
for level in coarse fine; do
  echo "training the $level networks: $GRID (log: $OUT/$level.log)"
  # shellcheck disable=SC2086
  "$MSNET" train -m level=$level $COMMON $OPT_ARGS $GRID "${EXTRA[@]}" trainer.progress=false \
    hydra.sweep.dir="$OUT/$level" > "$OUT/$level.log" 2>&1 || { tail -5 "$OUT/$level.log"; exit 1; }
done
echo "transferring (log: $OUT/transfer.log)"

for job in "$OUT"/coarse/*/; do
  i=$(basename "$job")
  [[ -f "$OUT/coarse/$i/checkpoints/last.pt" && -f "$OUT/fine/$i/checkpoints/last.pt" ]] || continue
  "$MSNET" transfer --from coarse --to fine ckpt="$OUT/coarse/$i/checkpoints/last.pt" \
    native="$OUT/fine/$i/checkpoints/last.pt" hydra.run.dir="$OUT/coarse_to_fine/$i" >> "$OUT/transfer.log"
  "$MSNET" transfer --from fine --to coarse ckpt="$OUT/fine/$i/checkpoints/last.pt" \
    native="$OUT/coarse/$i/checkpoints/last.pt" hydra.run.dir="$OUT/fine_to_coarse/$i" >> "$OUT/transfer.log"
done

"$PY" scripts/reproduce/resolution_table.py "$OUT"
