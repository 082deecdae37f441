#!/usr/bin/env bash
# Chang, Meng, Haber, Ruthotto, Begert, Holtham, "Reversible architectures for arbitrarily deep
# residual neural networks", AAAI 2018 (arXiv:1709.03698), from the shell:
#
#   1. the three reversible networks (Hamiltonian, Midpoint, Leapfrog; trained with
#      model.backprop=reversible) against a ResNet of the same size (forward Euler, same units,
#      widths, steps and about the same number of weights), on a training set (all of it in --full);
#      plus midpoint_plain, the midpoint rule on the plain field sigma(K Y + b), for comparison;
#   2. the same four networks trained on subsets of the training data (dataset.train_subset),
#      the paper's "fewer training data" experiment.
#
# Every run is a real `msnet train ... hydra.run.dir=OUT/...`; the tables are built from the
# runs' summary.json files. The paper's CIFAR accuracies are printed beside msnet's (see PAPER below).
#
#   scripts/reproduce/chang2018.sh            about 20-25 min on this project's 2-core CPU machine (5 nets):
#                                             Fashion-MNIST (offline), half-width nets with 4 steps per
#                                             unit, 3 epochs on 10,000 images; subsets of 500 and 2,000
#                                             images (10 and 4 epochs); estimated from measured step times,
#                                             not timed end to end
#   scripts/reproduce/chang2018.sh --quick    a few minutes: tiny nets, 2 epochs on 1,000 images
#   scripts/reproduce/chang2018.sh --full     the paper's setting: CIFAR-10, Hamiltonian-74-sized nets,
#                                             SGD 0.1 momentum 0.9, weight decay 2e-4, batch 100,
#                                             160 epochs (a GPU job; CIFAR-10 must be downloadable or on disk)
#   options: --dataset NAME (fashion_mnist | cifar10 | mnist ...), --out DIR (or OUT=DIR in the
#            environment; default outputs/reproduce/chang2018/DATE_MODE), --device cpu|cuda|auto
#            (default cpu, auto with --full),
#            --threads N (default 1 on the CPU: on 2 cores shared with other jobs, two threads made these
#            small layers several times slower); anything after `--` goes to every run (e.g. -- seed=1)
#
# msnet differences from the paper: no batch normalisation and no data augmentation; one LR
# decay (x0.1 at half the epochs) instead of the paper's two; midpoint/leapfrog sized by
# msnet (see conf/model/midpoint.yaml), not from the paper's table.
source "$(dirname "$0")/_common.sh"   # its own loop below reads --quick/--full with the other flags
DATASET=""
DEVICE=""
THREADS=1
OUT=${OUT:-}   # the environment's OUT=DIR, as in the other reproduce scripts; --out DIR wins
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --dataset) DATASET="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "reproduce_chang2018: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-outputs/reproduce/chang2018/$(date +%Y-%m-%d_%H-%M-%S)_$MODE}
if [ "$MODE" = full ]; then DEVICE=${DEVICE:-auto}; else DEVICE=${DEVICE:-cpu}; fi

# Per mode: dataset, widths of the Hamiltonian net / of the others, steps per unit, T, epochs,
# training images, subset sizes (with their epochs), optimiser.
case "$MODE" in
  quick)
    DATASET=${DATASET:-fashion_mnist}
    HAM_WIDTHS="[8,16,24]"; NET_WIDTHS="[6,12,16]"; LAYERS=2; T=2.0
    EPOCHS=2; TRAIN=1000; SUBSETS="200"; SUBSET_EPOCHS="4"
    DATA="dataset.val_size=500 dataset.test_subset=1000"; OPT="optimizer=adam trainer.batch_size=32"
    ;;
  default)
    DATASET=${DATASET:-fashion_mnist}
    HAM_WIDTHS="[16,32,56]"; NET_WIDTHS="[12,24,40]"; LAYERS=4; T=4.0
    EPOCHS=3; TRAIN=10000; SUBSETS="500 2000"; SUBSET_EPOCHS="10 4"
    DATA="dataset.val_size=1000 dataset.test_subset=5000"; OPT="optimizer=adam trainer.batch_size=64"
    ;;
  full)
    DATASET=${DATASET:-cifar10}
    HAM_WIDTHS="[32,64,112]"; NET_WIDTHS="[24,48,80]"; LAYERS=6; T=6.0
    EPOCHS=160; TRAIN=""; SUBSETS="2500 5000 10000"; SUBSET_EPOCHS="160 160 160"; DATA=""
    OPT="optimizer=sgd optimizer.lr=0.1 optimizer.momentum=0.9 optimizer.weight_decay=2e-4 optimizer.scheduler=step optimizer.step_size=80 optimizer.gamma=0.1 trainer.batch_size=100"
    ;;
esac

# net -> overrides. The ResNet is midpoint.yaml's network stepped by forward Euler: same units,
# widths, steps, pooling + zero-padded channels and GAP classifier, the same weights as midpoint
# and leapfrog and within 5% of the Hamiltonian net's.
net_overrides() {
  case "$1" in
    resnet)      echo "model=midpoint model.name=resnet model.integrator=euler model.widths=$NET_WIDTHS" ;;
    hamiltonian) echo "model=hamiltonian model.widths=$HAM_WIDTHS model.backprop=reversible" ;;
    midpoint)    echo "model=midpoint model.widths=$NET_WIDTHS model.backprop=reversible" ;;
    midpoint_plain) echo "model=midpoint model.residual=conv_act model.widths=$NET_WIDTHS model.backprop=reversible" ;;
    leapfrog)    echo "model=leapfrog model.widths=$NET_WIDTHS model.backprop=reversible" ;;
  esac
}
# midpoint_plain: the midpoint rule on msnet's first field sigma(K Y + b) (conv_act, tanh), on which no step size
# is stable (conf/model/midpoint.yaml); the comparison row for the stable conv_antisym midpoint.
NETS="resnet hamiltonian midpoint midpoint_plain leapfrog"

run() {  # run DIR EPOCHS SUBSET NET
  local dir=$1 epochs=$2 subset=$3 net=$4
  if [ -f "$dir/summary.json" ]; then echo "  $dir: done before, kept"; return; fi
  local data="dataset=$DATASET $DATA"
  [ -n "$subset" ] && data="$data dataset.train_subset=$subset"
  mkdir -p "$(dirname "$dir")"
  echo "  $net  ($dir)"
  # shellcheck disable=SC2046
  $MSNET train $data $(net_overrides "$net") model.layers=$LAYERS model.T=$T $OPT \
    trainer.epochs="$epochs" trainer.progress=false device="$DEVICE" threads="$THREADS" seed=0 \
    ${EXTRA[@]+"${EXTRA[@]}"} hydra.run.dir="$dir" > "$dir.log" 2>&1 \
    || { echo "  $net failed, see $dir.log" >&2; tail -3 "$dir.log" >&2; }
}

mkdir -p "$OUT"
echo "reproduce_chang2018 ($MODE): $DATASET, nets: $NETS, writing to $OUT"
echo "1) training set${TRAIN:+ of $TRAIN images}, $EPOCHS epoch(s)"
for net in $NETS; do run "$OUT/all/$net" "$EPOCHS" "$TRAIN" "$net"; done
set -- $SUBSET_EPOCHS
for n in $SUBSETS; do
  echo "2) $n training images, $1 epoch(s)"
  for net in $NETS; do run "$OUT/subset_$n/$net" "$1" "$n" "$net"; done
  shift
done

$PY - "$OUT" "$DATASET" "$NETS" "$SUBSETS" "${TRAIN:-all}" <<'EOF'
import json, sys
from pathlib import Path

out, dataset, nets, subsets, train = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
# The paper's test accuracies, Chang et al. 2018 (arXiv:1709.03698), Table 2, for the nets msnet's
# sizes follow (ResNet-32, Hamiltonian-74, and the midpoint/leapfrog nets of about the same size),
# as (CIFAR-10 %, CIFAR-100 %). None: not filled in -- the table could not be read from this
# project's offline sources when the script was written; copy the numbers from the paper.
PAPER = {
    "resnet": ("ResNet-32", None, None),
    "hamiltonian": ("Hamiltonian-74", None, None),
    "midpoint": ("MidPoint (paper's size)", None, None),
    "midpoint_plain": ("(plain-field midpoint)", None, None),
    "leapfrog": ("LeapFrog (paper's size)", None, None),
}


def summary(path):
    f = path / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def pct(x):
    return f"{100 * x:6.2f}" if isinstance(x, (int, float)) else "   n/a"


print(f"\nTable 1: test accuracy (%), {dataset}, training images: {train}")
print(f"{'net':<14} {'params':>8} {'msnet test':>10} {'val':>7} {'time s':>7} | {'paper net':<24} {'C-10':>6} {'C-100':>6}")
for net in nets:
    s = summary(out / "all" / net) or {}
    name, c10, c100 = PAPER[net]
    print(f"{net:<14} {s.get('parameters', 0):>8} {pct(s.get('final_test_acc')):>10} {pct(s.get('final_val_acc')):>7} "
          f"{s.get('wall_time_s', float('nan')):>7.0f} | {name:<24} {pct(c10):>6} {pct(c100):>6}")
if subsets:
    print(f"\nTable 2: test accuracy (%) with fewer training images, {dataset}")
    print(f"{'net':<14} " + " ".join(f"{n:>8}" for n in subsets) + f" {train:>8}")
    for net in nets:
        row = [summary(out / f"subset_{n}" / net) or {} for n in subsets] + [summary(out / "all" / net) or {}]
        print(f"{net:<14} " + " ".join(f"{pct(s.get('final_test_acc')):>8}" for s in row))
print(f"\nruns: {out}/*/*/summary.json (msnet report {out} lists them all)")
EOF
