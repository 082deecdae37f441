"""Dataclass schemas behind the YAML configs, registered in Hydra's ConfigStore.

The primary configs (``conf/train.yaml`` ...) list ``<cmd>_schema`` first in
their defaults, so a misspelt key or a value of the wrong type fails when the
config is composed, before anything runs. Group options with settings of their own
have a schema per option (Hydra's pattern: ``conf/optimizer/bcd.yaml`` starts with
``defaults: [bcd_schema]``, a :class:`BCDConfig` that extends :class:`OptimizerConfig`), so
each setting is declared once, here, and a plain run's config holds no BCD, MG/OPT or RMTR keys.
Closed choices are Enums: ``optimizer.scheduler=cosin`` fails at composition with the list
of valid values. Open choices (registries that grow: datasets, residuals, integrators,
optimisers, transfer operators) stay strings, checked by name before data is loaded.
"""


from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


class Choice(str, Enum):
    """A closed choice whose members compare, hash, print and serialise as their values (plain strings)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Scheduler(Choice):
    constant = "constant"
    cosine = "cosine"
    step = "step"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class Dtype(Choice):
    float32 = "float32"
    float64 = "float64"


class Backprop(Choice):
    store = "store"  # keep every step's state for the backward pass
    reversible = "reversible"  # rebuild states in the backward pass (reversible integrators only)


class Connective(Choice):
    conv = "conv"  # 1x1 conv + pool between stages
    pad = "pad"  # pool + zero channels


class Stencils(Choice):
    galerkin = "galerkin"  # the paper's R K_h P / its 9x9 inverse
    fit = "fit"  # Galerkin, refitted on sample images (msnet.multigrid.datafit)


class Cycle(Choice):
    V = "V"
    W = "W"


class GradientRestriction(Choice):
    transpose = "transpose"  # P^T: the coarse correction is a descent direction
    scaled = "scaled"  # N_f / N_c R


class LineSearch(Choice):
    none = "none"
    armijo = "armijo"


@dataclass
class DatasetConfig:
    name: str = "fashion_mnist"
    root: str = "~/.cache/msnet/data"
    download: bool = True
    val_size: int = 5000
    split_seed: int = 0
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    path: Optional[str] = None  # npz only
    # synthetic only
    n_train: int = 2000
    n_test: int = 500
    image_size: int = 16
    channels: int = 1
    num_classes: int = 4


@dataclass
class StochasticDepthConfig:
    """Stochastic depth (Huang et al. 2016): survival decays linearly over all layers to ``p_last``."""

    p_last: float = 1.0  # survival probability of the last layer; 1.0 turns it off


@dataclass
class ModelConfig:
    name: str = "resnet"
    channels: int = 16  # channels of the first stage
    growth: int = 2  # channel factor from one stage to the next
    stages: int = 1
    layers: int = 4  # time steps N per stage
    T: float = 1.0  # final time per stage; h = T / layers
    residual: str = "conv_act"
    activation: str = "tanh"
    integrator: str = "euler"
    classifier: str = "full_field"
    stochastic_depth: StochasticDepthConfig = field(default_factory=StochasticDepthConfig)
    widths: Optional[List[int]] = None  # channels per stage; null: channels * growth**i
    connective: Connective = Connective.conv  # between stages: conv (1x1 conv + pool) | pad (pool + zero channels)
    backprop: Backprop = Backprop.store  # store | reversible (rebuild states in backward; reversible integrators)
    step_bound: Optional[float] = None  # in (0, 1]: after each update, every step's h^p rho / limit <= it; null: off


@dataclass
class OptimizerConfig:
    """A ``torch.optim`` optimiser (``optimizer=adam|adamw|sgd``) and its per-epoch learning-rate schedule."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    scheduler: Scheduler = Scheduler.constant
    step_size: int = 10  # epochs between decays (step)
    gamma: float = 0.1  # decay factor (step)


@dataclass
class BCDConfig(OptimizerConfig):
    """``optimizer=bcd`` (msnet/training/bcd.py, conf/optimizer/bcd.yaml): block-coordinate descent."""

    name: str = "bcd"
    lr: float = 1.0  # first trial step length of the propagation line search (a Newton step)
    classifier_steps: int = 5  # inexact Newton-CG steps on the classifier per iteration (the paper's five)
    classifier_cg_iters: int = 10  # most CG iterations per Newton step (stops at ||r|| <= min(1/2, ||g||) ||g||)
    cg_iters: int = 10  # CG iterations of the propagation Gauss-Newton step (fixed)
    hessian_subsample: float = 0.125  # fraction (<= 1) or number (> 1) of the batch's images for the GN matrix
    armijo_c1: float = 1.0e-4  # sufficient decrease: J(theta + a d) <= J(theta) + c1 a g^T d
    backtrack: float = 0.5  # a <- a * backtrack after a failed trial
    max_backtracks: int = 8  # then the step is not taken (and the damping grows)
    damping: float = 1.0e-2  # Levenberg-Marquardt term added to the GN matrix (initial value)
    damping_adapt: bool = True  # lambda *= 2/3 if actual/predicted decrease > 3/4, *= 3/2 if < 1/4 or rejected


@dataclass
class TrainerConfig:
    """Single-level training (``trainer=single``), and what every trainer shares."""

    name: str = "single"
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 128
    log_every: int = 25  # batches between progress-bar updates
    progress: bool = True
    grad_clip: Optional[float] = None
    checkpoint_every: int = 1  # epochs
    eval_at_start: bool = False  # also measure validation loss/accuracy before each level's first epoch
    # data-parallel and GPU speed (msnet/training/distributed.py, msnet/training/speed.py); first-order optimizers only
    devices: int = 1  # K > 1: `msnet train` starts K processes with torchrun (DDP, one GPU or CPU share each)
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast around the forward; needs dtype=float32)
    compile: bool = False  # torch.compile the network the update rule calls
    channels_last: Optional[bool] = None  # NHWC images and 4-D weights; null: on CUDA only
    reversible_tf32: bool = False  # let reversible stages use TF32 convolutions on CUDA (default: IEEE float32)


@dataclass
class MGOptConfig(TrainerConfig):
    """``trainer=mgopt`` (msnet/training/mgopt.py, conf/trainer/mgopt.yaml): MG/OPT multilevel minimisation."""

    name: str = "mgopt"
    levels: int = 2  # L: level l has N / 2^(L-l) steps per stage over the same T; model.layers: a multiple of 2^(L-1)
    cycle: Cycle = Cycle.V  # V | W (W: each coarse problem gets two recursive cycles)
    nu1: int = 1  # pre-smoothing steps (every level but the coarsest)
    nu2: int = 1  # post-smoothing steps
    coarse_steps: int = 2  # smoother steps on the coarsest level
    coarse_lr_factor: float = 1.0  # coarse levels' learning rate = factor * optimizer.lr
    restriction: str = "injection"  # variables fine -> coarse (TIME_RESTRICTIONS)
    prolongation: str = "linear"  # corrections coarse -> fine (TIME_PROLONGATIONS)
    gradient_restriction: GradientRestriction = GradientRestriction.transpose  # transpose (P^T) | scaled (N_f/N_c R)
    line_search: LineSearch = LineSearch.none  # none: add the prolonged correction | armijo: backtrack on the level's objective
    armijo_c1: float = 1.0e-4
    max_backtracks: int = 4  # armijo: then the correction is dropped
    cycle_loss: bool = True  # steps.jsonl: fine batch loss after each cycle (one forward, not counted as work)


@dataclass
class RMTRConfig(TrainerConfig):
    """``trainer=rmtr`` (msnet/training/rmtr.py, conf/trainer/rmtr.yaml): recursive multilevel trust region (RMTR)."""

    name: str = "rmtr"
    levels: int = 2  # L: level l has N / 2^(L-l) steps per stage over the same T; 1: single-level trust region
    nu1: int = 1  # pre-smoothing trust-region steps per level
    nu2: int = 1  # post-smoothing trust-region steps per level
    coarse_steps: int = 2  # trust-region steps on the coarsest level
    restriction: str = "injection"  # variables fine -> coarse (TIME_RESTRICTIONS)
    prolongation: str = "linear"  # corrections coarse -> fine (TIME_PROLONGATIONS); gradients go by its transpose
    radius: float = 0.1  # initial trust-region radius of the finest level (2-norm of the whole step)
    radius_max: float = 10.0
    eta1: float = 0.1  # accept a step when rho = actual / predicted decrease >= eta1
    eta2: float = 0.75  # grow the radius when rho > eta2 and the step reached it
    gamma1: float = 0.5  # radius factor after a rejected step
    gamma2: float = 2.0  # radius factor after a very successful step at the boundary
    memory: int = 5  # L-SR1 pairs kept per level
    sr1_skip: float = 1.0e-8  # skip a pair unless |s.(y - Bs)| >= sr1_skip ||s|| ||y - Bs||
    sr1_gamma0: float = 1.0  # B_0 = sr1_gamma0 I until a pair with s.y > 0 sets gamma = y.y / s.y
    kappa_g: float = 1.0e-4  # recurse only when ||P^T g|| >= kappa_g ||g||
    window_max: int = 4  # most mini-batches in the objective (1: no growth)
    grow_patience: int = 10  # w: cycles of failed ratio tests, or 2w cycles of stalled loss, before the window doubles


@dataclass
class PyramidConfig:
    """Coarse-to-fine image-pyramid training (Haber et al. 2018, Alg. 1); lists run coarsest first."""

    levels: int = 2
    epochs: List[int] = field(default_factory=lambda: [2, 1])
    lr: Optional[List[Optional[float]]] = None  # per level (null entries: optimizer.lr); null: optimizer.lr on every level
    operator: str = "linear"  # image/stencil transfer (msnet.multigrid.TRANSFERS)
    sigma: float = 1.0  # Gaussian smoothing (fine pixels) before each restriction of the images
    stencils: Stencils = Stencils.galerkin  # galerkin (the paper's) | fit: Galerkin refitted on sample images
    fit_images: int = 256  # training images the fit uses at each prolongation
    fit_ridge: float = 1.0e-3  # pull towards the Galerkin stencils, relative to the data term


@dataclass
class DepthConfig:
    """Shallow-to-deep training (Haber et al. 2018, Sec. 3): layers start, start*factor, ..., stop; T kept."""

    start: int = 2
    stop: int = 16
    factor: int = 2
    epochs: List[int] = field(default_factory=lambda: [1])  # per depth level (shallowest first), or one for all
    lr: Optional[List[float]] = None  # per depth level, or one for all; null: optimizer.lr
    prolongation: str = "linear"  # msnet.multigrid.TIME_PROLONGATIONS


@dataclass
class RegularizerConfig:
    """The paper's derivative-based regularisers (Haber et al. 2018, Sec. 4; Haber & Ruthotto 2017)."""

    classifier_smoothness: float = 0.0  # weight of ||grad W||^2 over the classifier grid
    stencil_smoothness: float = 0.0  # weight of sum_k ||K_{k+1} - K_k||^2 / h across layers


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    pyramid: Optional[PyramidConfig] = None
    depth: Optional[DepthConfig] = None
    level: str = "fine"  # resolution to train at: fine (native), coarse, coarser, or a pixel size
    seed: int = 0
    device: str = "auto"
    dtype: Dtype = Dtype.float32
    threads: Optional[int] = None
    resume: Optional[str] = None
    init: Optional[str] = None  # warm start: weights from a checkpoint (e.g. msnet transfer's), fresh optimiser


def settings_from(cls: type, cfg: Any) -> Any:
    """The schema dataclass ``cls`` filled from ``cfg``'s keys of the same names: a composed (typed) group
    config, or the plain dict a saved run's checkpoint holds; keys it lacks take the schema's defaults."""
    return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def _all_optional(cls: type, name: str) -> type:
    """A copy of dataclass ``cls`` whose fields are all Optional and default to None ("keep")."""
    return make_dataclass(name, [(f.name, Optional[f.type], None) for f in fields(cls)])


DatasetOverride = _all_optional(DatasetConfig, "DatasetOverride")
"""Evaluate's dataset fields: None keeps the checkpoint's value, anything else replaces it."""


@dataclass
class EvaluateConfig:
    ckpt: Optional[str] = None
    dataset: Any = field(default_factory=DatasetOverride)
    splits: Any = field(default_factory=lambda: ["val", "test"])
    device: str = "auto"
    threads: Optional[int] = None
    batch_size: int = 128


@dataclass
class TransferConfig:
    source: Optional[str] = None  # level of the checkpoint: fine, coarse, coarser or a pixel size
    target: Optional[str] = None  # level to move it to
    ckpt: Optional[str] = None  # default: the latest run under `outputs` trained at `source`
    native: Optional[str] = None  # a checkpoint trained at `target`, for comparison
    source_depth: Optional[int] = None  # --from-depth: layers per stage of the checkpoint
    target_depth: Optional[int] = None  # --to-depth: layers per stage to move it to (T kept)
    prolongation: str = "linear"  # time prolongation (TIME_PROLONGATIONS)
    restriction: str = "injection"  # time restriction (TIME_RESTRICTIONS)
    outputs: str = "outputs"  # where to look for runs when ckpt is not given
    operator: str = "linear"
    sigma: float = 1.0  # smoothing before each image restriction (as in pyramid training)
    stencils: Stencils = Stencils.galerkin  # the checkpoint written: galerkin | fit (Galerkin refitted on training images)
    fit_images: int = 256  # training images of the data-fitted transfer (its row is always measured)
    fit_ridge: float = 1.0e-3
    splits: Any = field(default_factory=lambda: ["val", "test"])
    device: str = "auto"
    threads: Optional[int] = None
    batch_size: int = 128


@dataclass
class ReportConfig:
    dir: Optional[str] = None
    sort: Optional[str] = None
    group_by: Optional[List[str]] = None  # --group-by model.layers,optimizer: mean ± std over the other keys (seeds)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="report_schema", node=ReportConfig)
    cs.store(name="transfer_schema", node=TransferConfig)
    cs.store(group="optimizer", name="bcd_schema", node=BCDConfig)
    cs.store(group="trainer", name="mgopt_schema", node=MGOptConfig)
    cs.store(group="trainer", name="rmtr_schema", node=RMTRConfig)


def compose_config(overrides: List[str], name: str = "train") -> Any:
    """msnet's real ``name`` config (``conf/NAME.yaml`` with its schema) with these overrides,
    composed outside a Hydra app, as ``msnet NAME OVERRIDES`` would compose it (for scripts
    and benchmarks that drive msnet's library directly)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))
