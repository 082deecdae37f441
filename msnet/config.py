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


import copy
import dataclasses
import difflib
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


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


class DepthSizing(Choice):
    epochs = "epochs"  # depth.epochs are epochs at each depth level
    cost = "cost"  # depth.epochs are deep-epoch equivalents: d layers train epochs * stop / d epochs


class Stencils(Choice):
    galerkin = "galerkin"  # the paper's R K_h P / its 9x9 inverse
    fit = "fit"  # Galerkin, refitted on sample images (msnet.multigrid.datafit)


class Cycle(Choice):
    V = "V"
    W = "W"

    @property
    def gamma(self) -> int:
        """Coarse-level visits per cycle (Briggs, Henson & McCormick, *A Multigrid Tutorial*, ch. 3): V 1, W 2."""
        return {"V": 1, "W": 2}[self.value]


class GradientRestriction(Choice):
    transpose = "transpose"  # P^T: the coarse correction is a descent direction
    scaled = "scaled"  # N_f / N_c R


class LineSearch(Choice):
    none = "none"
    armijo = "armijo"


class Objective(Choice):
    """What a run returns to a sweeper (``trainer.objective``): a key of its ``summary.json``, validation only."""

    best_val_acc = "best_val_acc"  # highest validation accuracy over the epochs of the last level
    final_val_acc = "final_val_acc"  # validation accuracy of the network the run ends with
    best_val_loss = "best_val_loss"  # lowest validation loss over the epochs of the last level
    final_val_loss = "final_val_loss"

    @property
    def direction(self) -> str:
        """``maximize`` for accuracies, ``minimize`` for losses (Optuna's names)."""
        return "maximize" if self.value.endswith("_acc") else "minimize"

    @property
    def monitor(self) -> "tuple[str, bool]":
        """The per-epoch validation metric behind it and whether higher is better: ``("val_acc", True)`` for an
        accuracy, ``("val_loss", False)`` for a loss. Early stopping (``trainer.patience``), a schedule's plateau
        rule (``trainer.level_patience``) and ``checkpoints/best.pt`` all watch this one metric."""
        return ("val_acc", True) if self.value.endswith("_acc") else ("val_loss", False)

    @property
    def worst(self) -> float:
        """The value a failed run returns to the sweeper: the worst there is in this direction (+-inf)."""
        return float("-inf") if self.direction == "maximize" else float("inf")


@dataclass
class DatasetConfig:
    name: str = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | npz | synthetic (the dataset registry)
    root: str = "~/.cache/msnet/data"  # where datasets are unpacked or downloaded (MSNET_DATA moves it)
    create_root: bool = False  # create a dataset.root that does not exist (the default cache is always created)
    download: bool = True  # mnist/cifar10: download through torchvision when missing
    val_size: int = 5000  # training images held out for validation
    split_seed: int = 0  # seed of the train/validation split (fixed across runs and seeds)
    train_subset: Optional[int] = None  # train on the first N training images; null: all
    test_subset: Optional[int] = None  # test on the first N test images; null: all
    path: Optional[str] = None  # npz only
    # synthetic only
    n_train: int = 2000  # synthetic only: training images
    n_test: int = 500  # synthetic only: test images
    image_size: int = 16  # synthetic only: side in pixels
    channels: int = 1  # synthetic only: image channels
    num_classes: int = 4  # synthetic only: classes


@dataclass
class StochasticDepthConfig:
    """Stochastic depth (Huang et al. 2016): survival decays linearly over all layers to ``p_last``."""

    p_last: float = 1.0  # survival probability of the last layer; 1.0 turns it off


@dataclass
class ModelConfig:
    name: str = "resnet"  # the preset (conf/model/NAME.yaml), recorded with the run
    channels: int = 16  # channels of the first stage
    growth: int = 2  # channel factor from one stage to the next
    stages: int = 1  # stages of layers, joined by the connective
    layers: int = 4  # time steps N per stage
    T: float = 1.0  # final time per stage; h = T / layers
    residual: str = "conv_act"  # the residual function F (msnet.core.residuals.RESIDUALS)
    activation: str = "tanh"  # sigma in F (tanh, relu, ...)
    integrator: str = "euler"  # the time stepper: euler, rk2, rk4, lm, hamiltonian, midpoint, leapfrog (INTEGRATORS)
    classifier: str = "full_field"  # full_field (h^d W^T y + mu, the papers') | gap (global average pooling + linear)
    stochastic_depth: StochasticDepthConfig = field(default_factory=StochasticDepthConfig)
    widths: Optional[List[int]] = None  # channels per stage; null: channels * growth**i
    connective: Connective = Connective.conv  # between stages: conv (1x1 conv + pool) | pad (pool + zero channels)
    backprop: Backprop = Backprop.store  # store | reversible (rebuild states in backward; reversible integrators)
    step_bound: Optional[float] = None  # in (0, 1]: after each update, every step's h^p rho / limit <= it; null: off
    init_knots: Optional[int] = None  # time-smooth start: draws at K times, linear in t between (1: constant); null: every step drawn


@dataclass
class OptimizerConfig:
    """A ``torch.optim`` optimiser (``optimizer=adam|adamw|sgd``) and its per-epoch learning-rate schedule."""

    name: str = "adam"  # adam | adamw | sgd | bcd
    lr: float = 1e-3  # learning rate (bcd: first trial step)
    weight_decay: float = 0.0  # L2 weight decay
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    beta1: float = 0.9  # adam/adamw only
    beta2: float = 0.999  # adam/adamw only
    scheduler: Scheduler = Scheduler.constant  # learning rate per epoch: constant | cosine | step
    step_size: int = 10  # epochs between decays (step)
    gamma: float = 0.1  # decay factor (step)


@dataclass
class BCDConfig(OptimizerConfig):
    """``optimizer=bcd`` (msnet/methods/bcd.py, conf/optimizer/bcd.yaml): block-coordinate descent."""

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

    name: str = "single"  # single | mgopt | rmtr: how each mini-batch updates the weights
    epochs: int = 3  # epochs of a single-level run (schedules set their own per level)
    batch_size: int = 128  # training mini-batch (the global batch under DDP)
    batch_growth: float = 1.0  # the mini-batch is multiplied by this every epoch (1: fixed), up to batch_max
    batch_max: Optional[int] = None  # the largest mini-batch under batch_growth; null: the whole training set
    eval_batch_size: int = 128  # batch of validation and test passes
    log_every: int = 25  # batches between progress-bar updates
    progress: bool = True  # show the progress bar
    grad_clip: Optional[float] = None  # clip the gradient norm to this; null: no clipping
    checkpoint_every: int = 1  # epochs
    save_best: bool = True  # also keep checkpoints/best.pt: the last level's epoch with the best validation metric of trainer.objective
    eval_at_start: bool = False  # also measure validation loss/accuracy before each level's first epoch
    # schedules (+pyramid, +depth): a level before the last moves on once the monitored validation metric (that of
    # trainer.objective) has not improved for this many epochs, its scheduled epochs the most it trains; null: all
    level_patience: Optional[int] = None
    # early stopping: the run (its last level) ends once the monitored validation metric has not improved for this many epochs
    patience: Optional[int] = None
    min_delta: float = 0.0  # under level_patience and patience, an improvement is a change of the monitored metric by more than this
    # data-parallel and GPU speed (msnet/training/distributed.py, msnet/training/speed.py); first-order optimizers only
    devices: int = 1  # K > 1: `msnet train` starts K processes with torchrun (DDP, one GPU or CPU share each)
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast around the forward; needs dtype=float32)
    compile: bool = False  # torch.compile the network the update rule calls
    channels_last: Optional[bool] = None  # NHWC images and 4-D weights; null: on CUDA only
    reversible_tf32: bool = False  # let reversible stages use TF32 convolutions on CUDA (default: IEEE float32)
    # returned to a sweeper (hydra/sweeper=optuna; accuracies maximised, losses minimised), and the validation metric
    # that patience, level_patience and best.pt watch (val_acc for an accuracy objective, val_loss for a loss)
    objective: Objective = Objective.best_val_acc


@dataclass
class MGOptConfig(TrainerConfig):
    """``trainer=mgopt`` (msnet/methods/mgopt.py, conf/trainer/mgopt.yaml): MG/OPT multilevel minimisation."""

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
    armijo_c1: float = 1.0e-4  # armijo: sufficient-decrease constant
    max_backtracks: int = 4  # armijo: then the correction is dropped
    cycle_loss: bool = True  # steps.jsonl: fine batch loss after each cycle (one forward, not counted as work)


@dataclass
class RMTRConfig(TrainerConfig):
    """``trainer=rmtr`` (msnet/methods/rmtr.py, conf/trainer/rmtr.yaml): recursive multilevel trust region (RMTR)."""

    name: str = "rmtr"
    levels: int = 2  # L: level l has N / 2^(L-l) steps per stage over the same T; 1: single-level trust region
    nu1: int = 1  # pre-smoothing trust-region steps per level
    nu2: int = 1  # post-smoothing trust-region steps per level
    coarse_steps: int = 2  # trust-region steps on the coarsest level
    restriction: str = "injection"  # variables fine -> coarse (TIME_RESTRICTIONS)
    prolongation: str = "linear"  # corrections coarse -> fine (TIME_PROLONGATIONS); gradients go by its transpose
    radius: float = 0.1  # initial trust-region radius of the finest level (2-norm of the whole step)
    radius_max: float = 10.0  # largest trust-region radius
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
    epochs: List[float] = field(default_factory=lambda: [1])  # per depth level (shallowest first) or one; fractions ok
    lr: Optional[List[float]] = None  # per depth level, or one for all; null: optimizer.lr
    prolongation: str = "linear"  # msnet.multigrid.TIME_PROLONGATIONS
    # A level of stop / 2^k layers costs 2^-k of a level of stop layers per epoch: sizing=cost budgets in the latter.
    sizing: DepthSizing = DepthSizing.epochs  # epochs | cost: depth.epochs at depth.stop's cost (d layers: x stop / d)
    carry_optimizer: bool = False  # true: the optimiser's moments move with the weights (prolonged, scaled for h); false: fresh


@dataclass
class RegularizerConfig:
    """The paper's derivative-based regularisers (Haber et al. 2018, Sec. 4; Haber & Ruthotto 2017)."""

    classifier_smoothness: float = 0.0  # weight of ||grad W||^2 over the classifier grid
    stencil_smoothness: float = 0.0  # weight of sum_k ||K_{k+1} - K_k||^2 / h across layers


@dataclass
class TensorBoardLoggerConfig:
    """``logger=tensorboard`` (``pip install 'msnet[tensorboard]'``): event files for ``tensorboard --logdir``."""

    log_dir: Optional[str] = None  # null: <run dir>/tensorboard (a sweep's jobs: one folder each under the sweep dir)
    flush_secs: int = 10  # seconds between writes of the event file to disk


@dataclass
class MLflowLoggerConfig:
    """``logger=mlflow`` (``pip install 'msnet[mlflow]'``): one MLflow run per msnet run (per job of a sweep)."""

    tracking_uri: Optional[str] = None  # null: sqlite:///<abs path of outputs>/mlflow.db (artifacts beside it)
    experiment: str = "msnet"  # experiment name; a sweep's jobs all go to this one
    run_name: Optional[str] = None  # null: the run dir's last two folders (DATE/TIME, a sweep job's TIME/JOB)


class WandbMode(Choice):
    offline = "offline"  # files under <dir>/wandb only, no network and no login (upload later: wandb sync)
    online = "online"  # streamed to the W&B server (after wandb login)
    disabled = "disabled"  # W&B's no-op run: nothing written


@dataclass
class WandbLoggerConfig:
    """``logger=wandb`` (``pip install 'msnet[wandb]'``): one Weights & Biases run per msnet run (per job of a sweep)."""

    project: str = "msnet"  # W&B project; a sweep's jobs all go to this one
    entity: Optional[str] = None  # W&B user or team; null: the logged-in user's default
    mode: WandbMode = WandbMode.offline  # offline | online | disabled
    dir: Optional[str] = None  # null: the run dir (W&B writes its wandb/ folder inside)
    tags: List[str] = field(default_factory=list)  # tags of the W&B run
    group: Optional[str] = None  # null: the sweep folder in a -m sweep (as MLflow's msnet.sweep tag), else none
    name: Optional[str] = None  # null: the run dir's last two folders (DATE/TIME, a sweep job's TIME/JOB)


@dataclass
class LoggerConfig:
    """Where a run's records also go besides its run directory: each chosen tracker's settings under its own
    key (``logger=mlflow`` sets ``logger.mlflow``; ``logger=[tensorboard,mlflow]`` both); ``logger=none``: nowhere.

    Every tracker gets the same records (msnet/runs/tracking.py): each ``metrics.jsonl`` row, each
    ``steps.jsonl`` row, the flattened resolved config with the final metrics, and the run's figures.
    """

    tensorboard: Optional[TensorBoardLoggerConfig] = None  # set by logger=tensorboard (conf/logger/tensorboard.yaml)
    mlflow: Optional[MLflowLoggerConfig] = None  # set by logger=mlflow (conf/logger/mlflow.yaml)
    wandb: Optional[WandbLoggerConfig] = None  # set by logger=wandb (conf/logger/wandb.yaml)
    log_checkpoint: bool = False  # true: the run's checkpoints also go to MLflow / W&B as artifacts at its end


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # also send the run's records to: logger=NAME or logger=[A,B] (conf/logger/)
    pyramid: Optional[PyramidConfig] = None  # image-pyramid schedule: +pyramid=NAME (conf/pyramid/)
    depth: Optional[DepthConfig] = None  # shallow-to-deep schedule: +depth=NAME (conf/depth/)
    level: str = "fine"  # resolution to train at: fine (native), coarse, coarser, or a pixel size
    seed: int = 0  # seeds initialisation, batch order and stochastic depth (every sweep job uses the seed it is given)
    device: str = "auto"  # auto (CUDA when there is a GPU) | cpu | cuda
    dtype: Dtype = Dtype.float32  # float32 | float64
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    resume: Optional[str] = None  # continue the run of this checkpoint (same model, new run directory)
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
    ckpt: Optional[str] = None  # the checkpoint to evaluate (msnet evaluate PATH); a run directory works too
    dataset: Any = field(default_factory=DatasetOverride)
    splits: Any = field(default_factory=lambda: ["val", "test"])  # splits to evaluate
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    batch_size: int = 128  # evaluation batch


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
    operator: str = "linear"  # image/stencil transfer pair (msnet.multigrid.TRANSFERS): linear | constant
    sigma: float = 1.0  # smoothing before each image restriction (as in pyramid training)
    stencils: Stencils = Stencils.galerkin  # the checkpoint written: galerkin | fit (Galerkin refitted on training images)
    fit_images: int = 256  # training images of the data-fitted transfer (its row is always measured)
    fit_ridge: float = 1.0e-3  # pull towards the Galerkin stencils, relative to the data term
    splits: Any = field(default_factory=lambda: ["val", "test"])  # splits evaluated before and after
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    batch_size: int = 128  # evaluation batch


@dataclass
class ReportConfig:
    dir: Optional[str] = None  # the folder to report on (msnet report DIR): a run, a sweep, outputs/
    sort: Optional[str] = None  # a column to sort by (default: run directory)
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
    OmegaConf.register_new_resolver("msnet_direction", lambda name: Objective(str(name)).direction, replace=True)
    _store_optuna_preset(cs)


def _store_optuna_preset(cs: ConfigStore) -> None:
    """``hydra/sweeper=optuna``: the Optuna sweeper plugin's config with msnet's defaults, in place of the plugin's.

    It has to be a structured config of the same name rather than a YAML file beside the launcher presets:
    Hydra refuses a YAML file that matches a schema with a defaults list (the plugin's picks its sampler).
    Hydra's plugin scan re-executes the plugin's config module, which stores the plugin's own node again,
    so the scan is run first (once per process) and msnet's node stored after it. Without the plugin
    (``pip install 'msnet[sweep]'``) there is nothing to replace.
    """
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    @dataclass
    class OptunaPreset(OptunaSweeperConf):
        # maximize for trainer.objective=best_val_acc|final_val_acc, minimize for best_val_loss|final_val_loss
        direction: Any = "${msnet_direction:${trainer.objective}}"
        # trials asked of the sampler at once and launched together: hydra/launcher=joblib runs a batch in parallel
        n_jobs: int = 1

    Plugins.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaPreset, provider="msnet")
    # Every sampler that takes a seed (tpe, random, cmaes, nsgaii, motpe; not grid) is seeded with the run's
    # seed, so a study is repeatable; every trial trains with that seed too.
    for file in cs.list("hydra/sweeper/sampler"):
        node = copy.deepcopy(cs.load(f"hydra/sweeper/sampler/{file}").node)
        if "seed" in node:
            node.seed = "${seed}"
            cs.store(group="hydra/sweeper/sampler", name=file.removesuffix(".yaml"), node=node, provider="msnet")


def compose_config(overrides: List[str], name: str = "train") -> Any:
    """msnet's real ``name`` config (``conf/NAME.yaml`` with its schema) with these overrides,
    composed outside a Hydra app, as ``msnet NAME OVERRIDES`` would compose it (for scripts
    and benchmarks that drive msnet's library directly)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def missing_key(full_key: str, keys: List[str]) -> str:
    """``model has no key 'layres'; did you mean layers?`` (or the keys it has, when none is close)."""
    parent, _, key = full_key.rpartition(".")
    where = parent or "the config"
    close = difflib.get_close_matches(key, [str(k) for k in keys], n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"its keys: {', '.join(str(k) for k in keys)}"
    return f"{where} has no key {key!r}; {hint}"


def unknown_keys(cfg: DictConfig, prefix: str = "") -> List[tuple]:
    """Keys of ``cfg`` that its schema lacks: ``[(full key, the schema's keys)]``, depth first.

    Hydra lets ``+trainer.foo=1`` add a key to a structured node; such a key is written to ``config.yaml``
    and read by nothing, so a typo (``+trainer.patiense=3``) would silently change nothing.
    """
    out: List[tuple] = []
    schema = OmegaConf.get_type(cfg)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if known is not None and key not in known:
            out.append((full, known))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            out += unknown_keys(node, full + ".")
    return out


def check_known_keys(cfg: DictConfig, overrides: Optional[List[str]] = None) -> None:
    """Refuse, in one line, a key the schema of its group lacks (``+trainer.foo=1``), naming the override typed
    (``overrides``: the command line's; by default the Hydra job's, where there is one)."""
    from hydra.core.hydra_config import HydraConfig

    from msnet.errors import MsnetError

    unknown = unknown_keys(cfg)
    if unknown:
        if overrides is None and HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
        key, known = unknown[0]
        typed = next((o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0] == key), key)
        raise MsnetError(f"{typed}: {missing_key(key, known)}")


def stochastic_depth_p_last(model_cfg: Any) -> float:
    """``model.stochastic_depth.p_last`` (1.0: off)."""
    return float(model_cfg.stochastic_depth.p_last)


GROUP_SCHEMAS = {("trainer", "mgopt"): "MGOptConfig", ("trainer", "rmtr"): "RMTRConfig", ("optimizer", "bcd"): "BCDConfig"}
"""Group options with a schema of their own (the rest use the group's field type in :class:`TrainConfig`)."""


def upgrade_config(saved: Any) -> Dict[str, Any]:
    """A saved run's config (a checkpoint's ``config``) on today's schema: every key a later msnet added gets the
    schema's default, so the code reads plain attributes instead of re-stating defaults for old checkpoints.

    Done once, where checkpoints are read (:func:`msnet.runs.checkpoint.load_checkpoint`). The trainer and
    optimizer options with schemas of their own (``trainer=mgopt``) take theirs, by the saved name; a saved
    ``+pyramid`` or ``+depth`` takes its schema. Keys the schema no longer has are kept as they were saved.
    """
    saved = OmegaConf.to_container(saved, resolve=False) if isinstance(saved, DictConfig) else copy.deepcopy(saved)
    base = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(base, False)
    out: Dict[str, Any] = {}
    for key, value in saved.items():
        schema = _group_schema(key, value)
        if schema is None:
            out[key] = value
            continue
        node = OmegaConf.structured(schema)
        OmegaConf.set_struct(node, False)
        try:
            out[key] = OmegaConf.to_container(OmegaConf.merge(node, value), resolve=False, enum_to_str=True)
        except Exception:  # a value today's schema refuses: keep the saved one, the checks say what is wrong
            out[key] = value
    for key, value in OmegaConf.to_container(base, resolve=False, enum_to_str=True).items():
        out.setdefault(key, value)
    return out


def _group_schema(key: str, value: Any) -> Optional[type]:
    """The schema dataclass of top-level ``key`` holding ``value`` (None: not a schema'd group)."""
    if not isinstance(value, dict):
        return None
    named = GROUP_SCHEMAS.get((key, str(value.get("name"))))
    if named is not None:
        return globals()[named]
    field_type = {f.name: f.type for f in fields(TrainConfig)}.get(key)
    if isinstance(field_type, str):
        field_type = eval(field_type, globals())  # annotations are strings under `from __future__ import annotations`
    for candidate in (field_type, *getattr(field_type, "__args__", ())):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None
