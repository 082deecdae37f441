#!/usr/bin/env bash
# Lu, Zhong, Li, Dong, "Beyond finite layer neural networks" (ICML 2018, arXiv:1710.10121): the
# LM-architecture u_{n+1} = u_n - k_n (u_n - u_{n-1}) + h F(u_n) against the ResNet (forward Euler)
#   1. at equal depth and parameters (ResNet-(6n+2) vs LM-ResNet-(6n+2), and again at n/2),
#   2. LM-ResNet at half depth against the full ResNet (the paper's >50 % compression claim),
# each without and with stochastic depth (p_last = 0.5, linear decay over the whole network).
# Pre-activation basic blocks, 3 stages (c, 2c, 4c channels), GAP classifier; see conf/model/*_cifar.yaml.
# Prints msnet's test errors beside the paper's CIFAR-10 numbers and plots the learned k_n.
#
#   scripts/reproduce/lu2018.sh            # default: Fashion-MNIST (offline), 10k training images, 8 channels,
#                                          #   n = 4 and 2 (26 and 14 layers), 3 epochs, 8 runs, one seed:
#                                          #   estimated 13-20 min on 2 idle CPU cores (not timed end to end)
#   scripts/reproduce/lu2018.sh --quick    # smoke run: 3000 images, 4 channels, n = 2 and 1, 2 epochs
#                                          #   (7.5 min measured on 2 cores shared with two other jobs)
#   scripts/reproduce/lu2018.sh --full     # the paper's setting: CIFAR-10 (downloads), 16 channels,
#                                          #   n = 18 and 9 (ResNet-110 / LM-ResNet-56), SGD 0.1, 160 epochs (days on a CPU)
#   scripts/reproduce/lu2018.sh --quick seed=1 device=cpu   # extra overrides go to every run (and win)
# Output: $OUT (default outputs/reproduce/lu2018/DATE) with every run (OUT/ROLE/JOB), table.md,
# table.json and k_n.png there.
source "$(dirname "$0")/_common.sh"
shift "$SHIFT"
OUT=${OUT:-outputs/reproduce/lu2018/$(date +%Y-%m-%d_%H-%M-%S)}

case $MODE in
  quick)
    N=2; C=4
    COMMON="dataset.train_subset=3000 dataset.val_size=500 dataset.test_subset=1000 trainer.epochs=2" ;;
  default)
    N=4; C=8
    COMMON="dataset.train_subset=10000 dataset.val_size=2000 trainer.epochs=3" ;;
  full)
    # He et al. 2016's CIFAR protocol as far as msnet has it: SGD 0.1, momentum 0.9, weight decay 1e-4,
    # batch 128, lr / 10 every 80 epochs (He et al.: at 32k and 48k of 64k iterations), no augmentation.
    N=18; C=16
    COMMON="dataset=cifar10 optimizer=sgd optimizer.lr=0.1 optimizer.momentum=0.9 optimizer.weight_decay=1e-4
            optimizer.scheduler=step optimizer.step_size=80 optimizer.gamma=0.1 trainer.epochs=160" ;;
esac
HALF=$(( N / 2 ))
SD="model.stochastic_depth.p_last=1.0,0.5"
EXTRA=("$@")
echo "reproduce_lu2018: mode $MODE, n = $N (depth $(( 6 * N + 2 ))) and $HALF (depth $(( 6 * HALF + 2 ))), output $OUT"

run() {  # run ROLE MODEL LAYERS: a 2-job sweep (stochastic depth off, on) into $OUT/ROLE
  local role=$1 model=$2 layers=$3
  local name=${model%56_cifar}$(( 6 * layers + 2 ))
  # shellcheck disable=SC2086
  "$MSNET" train -m "model=$model" "model.name=$name" "model.layers=$layers" "model.channels=$C" $SD \
    $COMMON "${EXTRA[@]}" trainer.progress=false hydra.sweep.dir="$OUT/$role"
}

run resnet      resnet56_cifar    "$N"
run lm          lm_resnet56_cifar "$N"
run resnet_half resnet56_cifar    "$HALF"
run lm_half     lm_resnet56_cifar "$HALF"

"$PY" scripts/reproduce/lu2018_table.py "$OUT"
