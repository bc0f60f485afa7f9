"""The config schema: every key in `configs/` is declared here, with its default, so a typo is an error and no
YAML file restates a default; and the checks of values against it.

The dataclasses below are the typed arguments of the Python API (`tahoe_ft.train(TrainConfig(...))`); a key with
a fixed set of values is a StrEnum. `validate` merges a composed config into its schema: unknown keys (a typo in
an experiment file or on the command line) and values of the wrong type raise `UserError` with the key's full
path; `checked` does the same for a dataclass built in Python. The `model.*` section (`ModelConfig`,
`BackboneConfig`) is declared beside the model's hparams, in `tahoe_ft.model.hparams`, each option once.
Composing a command's config from `configs/` with Hydra is `tahoe_ft.config`'s job, and `tahoe_ft.config`
re-exports every name here: it is the public import path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tahoe_ft.data.labels import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_PERT, DEFAULT_PERT_COL
from tahoe_ft.datasets.spec import DemoSpec
from tahoe_ft.errors import UserError
from tahoe_ft.model.hparams import BackboneConfig as BackboneConfig  # model.backbone (re-exported)
from tahoe_ft.model.hparams import ModelConfig

T = TypeVar("T")

# -- options with a fixed set of values: StrEnums (str() is the value, `== "bf16"` holds); composition rejects
# any other value with one line naming the key and the allowed values ------------------------------------


class InputTransform(StrEnum):
    log1p = "log1p"
    counts = "counts"


class BasalMapping(StrEnum):
    random = "random"
    batch = "batch"


class EncoderName(StrEnum):
    raw_expression = "raw_expression"
    se600m = "se600m"


class LossName(StrEnum):
    energy = "energy"
    sinkhorn = "sinkhorn"
    mse = "mse"


class SchedName(StrEnum):
    cosine = "cosine"
    onecycle = "onecycle"
    constant = "constant"


class Monitor(StrEnum):
    auto = "auto"
    main = "main"
    decoder = "decoder"


class Split(StrEnum):
    test = "test"
    val = "val"


class Regime(StrEnum):
    """What a fold holds out (`tahoe_ft.study.folds`): perturbations unseen in every context, part of one
    context's perturbations (the rest train there, all of them train elsewhere), one whole context (only its
    controls seen), or combinations 'A+B' whose singles train."""

    unseen_perturbation = "unseen_perturbation"
    few_shot_context = "few_shot_context"
    zero_shot_context = "zero_shot_context"
    unseen_combination = "unseen_combination"


class PredictOutput(StrEnum):
    log1p = "log1p"
    counts = "counts"


class ExportFormat(StrEnum):
    vcc = "vcc"
    vcc2026 = "vcc2026"


class Profile(StrEnum):
    vcc = "vcc"
    full = "full"


class _NumberNamedEnum(StrEnum):
    """An enum whose member names are numbers: `precision=32` on the command line arrives as the int 32."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.__members__.get(str(value))
        return None


# member names are what OmegaConf matches a value against, so "32" is spelled as a name too
Precision = _NumberNamedEnum("Precision", {"32": "32", "bf16": "bf16"})

# the demo's size and seed (`data.demo`, demo-check's `demo`): the generator's own spec, declared once
DemoConfig = DemoSpec


@dataclass
class DataConfig:
    name: str = "custom"
    # one .h5ad path or a list of them
    path: Any = None
    pert_col: str = DEFAULT_PERT_COL
    control_pert: str = DEFAULT_CONTROL_PERT
    cell_type_col: str = DEFAULT_CELL_TYPE_COL
    batch_col: str | None = None
    # what X holds: "log1p" (normalised, log1p) or "counts" (raw integers; normalised + log1p on read)
    input_transform: InputTransform = InputTransform.log1p
    # perturbation features (tahoe_ft.data.features): null/onehot, a torch.load-able dict name -> 1-D tensor,
    # pca (target gene's row of the training pseudobulks' principal components), coexpression (of the control
    # cells); or a list of these, concatenated
    pert_features: Any = None
    # width (K) of each derived source (pca, coexpression)
    pert_feature_dim: int = 16
    allow_missing_pert_features: bool = False
    # the evaluator's gene list (header-less CSV); null = the file's var_names
    gene_list: str | None = None
    val_perts: list = field(default_factory=list)
    test_perts: list = field(default_factory=list)
    split_toml: str | None = None
    # held-out cell types (zero-shot): their perturbed cells go to val/test
    val_cell_types: list = field(default_factory=list)
    test_cell_types: list = field(default_factory=list)
    batch_size: int = 16
    num_workers: int = 0
    prefetch_factor: int = 2
    # "random": basal controls of the same cell type; "batch": same cell type and batch
    basal_mapping: BasalMapping = BasalMapping.random
    # controls are also training targets (control -> control), as upstream
    yield_controls: bool = True
    # refuse to start when the loader's worst-case resident batches exceed this many GiB
    memory_budget_gb: float = 8.0
    # validation sets per (cell type, perturbation) group; fixed across evaluations
    val_sets_per_group: int = 2
    # re-centre each training and validation set's basal draws on the mean of their control pool (each cell
    # keeps its deviation), as predict's recentre_basal does for held-out groups; false: raw draws (upstream)
    recentre_basal: bool = False
    # generated data (data=demo); ignored for other data sets
    demo: DemoConfig | None = None
    # the regime that dealt split_toml (reproduce and sweep set it; recorded in the run's manifest and shown by
    # compare); null: not said
    regime: Regime | None = None


@dataclass
class DecoderConfig:
    hidden_dims: list = field(default_factory=lambda: [256, 256])
    dropout: float = 0.1
    residual_decoder: bool = False


@dataclass
class EncoderConfig:
    # "se600m" (obsm embedding in, gene decoder out) or "raw_expression" (genes in, genes out)
    name: EncoderName = EncoderName.raw_expression
    embed_key: str | None = None
    output_space: str = "all"
    decoder: DecoderConfig | None = None


@dataclass
class LossConfig:
    # "energy" (geomloss SamplesLoss("energy") equivalent), "sinkhorn" or "mse"
    name: LossName = LossName.energy
    blur: float = 0.05
    # weight of the gene-decoder loss (embedding input only): total = main + decoder_weight * decoder
    decoder_weight: float = 1.0
    # weight of the set-mean term (MSE of each set's mean in gene space, logged as train/mean_loss):
    # total += mean_weight * mean_loss; 0 = the study's loss. 10 was chosen on the validation perturbations of
    # Papalexi's 4 folds (val/mean_loss lower in every fold than with 0; docs/results.md "How the defaults were chosen")
    mean_weight: float = 10.0
    # an auxiliary target (the study's recommendation 1: SE600M as a signal, not the input): obsm key of an
    # embedding of each cell (e.g. X_state) that a small head predicts from the backbone's hidden state in a
    # gene-space round; total += aux_weight * energy(head(h), obsm[aux_key]), logged as train/aux_loss
    aux_key: str | None = None
    aux_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # LR multiplier for the modules that init_from re-initialises (those the parent could not give, e.g. a new
    # perturbation encoder or head) against the transferred ones; 1 = one LR for all (the study's)
    fresh_lr_factor: float = 1.0


@dataclass
class SchedConfig:
    # "cosine" (linear warmup then cosine), "onecycle" or "constant" (warmup then flat)
    name: SchedName = SchedName.cosine
    warmup_steps: int = 100
    # LR at the start of warmup and at the end of the cosine, as fractions of optim.lr
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.1


@dataclass
class FreezeConfig:
    # module names (first component of parameter names) kept frozen until `until_step`
    modules: list = field(default_factory=list)
    # null = frozen for the whole run; N = unfreeze at global step N (with `warmup_steps` of LR warmup)
    until_step: int | None = None
    warmup_steps: int = 100


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    val_check_interval: int = 100
    log_every_n_steps: int = 10
    gradient_clip_val: float = 1.0
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    # also keep fixed-step weights (step-N.pt) every N steps; null = none (ablations only)
    every_n_steps: int | None = None
    # keep last.ckpt (full state for resume=true)
    save_last: bool = True
    # the validation loss best-val.pt is chosen by: "main" (the study's: the energy distance in the model's
    # own space), "decoder" (the gene-space decoder loss of an SE600M round: what the evaluator scores) or
    # "auto" (decoder when there is one, else main: the default, lesson 1 of the study)
    monitor: Monitor = Monitor.auto
    # validate once before the first step: the starting weights (the parent's, or a feature prior's ridge) are a
    # candidate for best-val.pt, and the run's val loss curve starts at step 0, so what fine-tuning changed is
    # measured; false = the first validation after val_check_interval steps (the study's)
    validate_at_start: bool = True


@dataclass
class LoggerConfig:
    wandb: bool = True
    # "offline" (default; `wandb sync` later), "online" or "disabled"
    wandb_mode: str = "offline"
    wandb_project: str = "tahoe-ft"
    wandb_entity: str | None = None
    wandb_tags: list = field(default_factory=list)
    # wandb's run group (`tahoe-ft sweep` sets it to sweep-<NAME>, so a study's runs are grouped); null = none
    wandb_group: str | None = None


@dataclass
class PathsConfig:
    # where generated demo data and prepared embedded data sets live
    data_cache: str = "data_cache"


@dataclass
class TrainConfig:
    experiment: str = "default"
    # what the experiment file says about the case study (shown in compare)
    description: str = ""
    seed: int = 0
    runs_dir: str = "runs"
    # multiplies every study step count written as ${scaled:N} in configs/ (1.0 = the study's own counts)
    step_scale: float = 1.0
    # base checkpoint: a path, `run:EXP/FILE`, or an upstream ST checkpoint (`state tx train` .ckpt)
    pretrained: str | None = "run:pretrain/best-val.pt"
    # weights-only initialisation (fresh optimizer and schedule); may be "${pretrained}" or `run:EXP/FILE`
    init_from: str | None = None
    # continue the newest run of this experiment (or `run_dir`) from its last.ckpt
    resume: bool = False
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class PredictConfig:
    # a bare file name is looked up in <run_dir>/checkpoints/; a path or run:EXP/FILE is used as is
    ckpt: str = "best-val.pt"
    # default: the newest training run (of `experiment`, if set) under runs_dir
    run_dir: str | None = None
    # the newest run of this experiment (`exp=0906`; `experiment` is the name of the config group)
    exp: str | None = None
    runs_dir: str = "runs"
    # which held-out perturbations to predict: "test" or "val"
    split: Split = Split.test
    # read the cells from here instead of the paths recorded in the checkpoint's manifest
    data_path: Any = None
    # an upstream run folder's held-out groups (cell-load TOML); default: its config's toml_config_path
    split_toml: str | None = None
    # real control cells per cell type copied into pred.h5ad / real.h5ad (deterministic subsample)
    max_controls: int = 2000
    seed: int = 0
    device: str = "auto"
    # also predict every held-out group with another held-out perturbation's features (pred_shuffled.h5ad):
    # eval's shuffle test of whether the score owes anything to the perturbation
    shuffle: bool = True
    # sets per forward pass (1: the reference numbers; more: faster, equal to ~4e-7) and the precision of the
    # forward pass ("32", or "bf16": bfloat16 Linear weights, prepacked on CPUs with oneDNN bf16 kernels; with
    # sets_per_pass=16, 2.6x (20,000 cells) to 3.3x (60,000) state tx infer's cells/s at 18,080 genes, max
    # 6.7e-3 from float32; BENCHMARKS.md)
    sets_per_pass: int = 1
    precision: Precision = Precision["32"]
    # re-centre each held-out group's basal draws on the mean of the cell type's control cells written into
    # the files (what cell-eval takes deltas against) before the model sees them, each cell keeping its
    # deviation from the draws' mean: the predicted pseudobulk carries no basal sampling noise. false = the raw
    # draws (the study's). eval's baselines follow the prediction's choice
    recentre_basal: bool = True
    # log1p: pred.h5ad / real.h5ad only. counts: also pred_counts.h5ad / real_counts.h5ad (/ pred_shuffled_counts)
    # in integer counts for the VCC 2026 scorer: real and control cells the screen's raw counts (X for
    # input_transform=counts, else layers['counts']), predicted cells through tahoe_ft.evaluation.counts
    output: PredictOutput = PredictOutput.log1p


@dataclass
class EvalConfig:
    # default: pred.h5ad / real.h5ad of the newest predicted run (of `experiment`, if set)
    pred: str | None = None
    real: str | None = None
    run_dir: str | None = None
    exp: str | None = None
    runs_dir: str = "runs"
    # obs columns and control label of pred/real/train (as data.pert_col, data.control_pert, data.cell_type_col);
    # null: predict.json's (beside pred), else target_gene / non-targeting / no cell-type column. A value given
    # here wins over predict.json
    pert_col: str | None = None
    control_pert: str | None = None
    cell_type_col: str | None = None
    # predictions from anywhere: the training cells (.h5ad, log1p, real's genes: training perturbations and
    # controls) for the cell-mean normaliser, the baseline panel and the ceiling; with split_toml (a cell-load
    # TOML) train is the whole screen and the TOML's val/test perturbations are left out. Unset: the training
    # cells of the run's checkpoint (predict.json), if any
    train: str | None = None
    split_toml: str | None = None
    # perturbation features for the panel's feature_ridge (a torch.load-able dict name -> 1-D tensor, as
    # data.pert_features); unset: the run checkpoint's features, if any
    features: str | None = None
    # cell-eval profile: "vcc" (mae, discrimination_score_l1, overlap_at_N) or "full"
    profile: Profile = Profile.vcc
    num_threads: int = 2
    # score each cell type separately (cell-eval's --celltype-col) and average
    per_cell_type: bool = True
    # training cells per (cell type, perturbation) read for the cell-mean baseline and the panel
    max_train_cells_per_group: int = 500
    # score the baseline panel (control, cell_mean, pert_mean, target_knockdown, linear) and the data ceiling
    baselines: bool = True
    # the linear baseline (Ahlmann-Eltze et al. 2025): PCA dimension and ridge penalty
    linear_k: int = 10
    linear_ridge: float = 0.1
    # for predictions without a predict.json (files from elsewhere): re-centre the baselines' basal cells on the
    # control mean (predict's recentre_basal); with one, the prediction's own choice is followed
    recentre_basal: bool = True
    # the libraries' log records (cell-eval, pdex, ...) on the console too, not only in <run>/eval/eval.log
    # (the environment variable TAHOE_FT_VERBOSE=1 does the same)
    verbose: bool = False
    # also score with the VCC 2026 scorer (cell-eval2's vcc2026 preset; the extra tahoe-ft[vcc2026]) in count
    # space: the round, the panel and the generator null emitted as integer counts (evaluation.counts, seeded,
    # library sizes from real's control cells; real's own counts: layers['counts'] or obs library sizes), the
    # amplitude audit (the effect x0.5/x1/x2); files and evaluation_results.json under <run>/eval/vcc2026/
    vcc2026: bool = False
    # the replicate anchor's disjoint half-splits (the scale's 1 end; the competition uses 5)
    vcc2026_splits: int = 5


@dataclass
class CompareConfig:
    runs_dir: str = "runs"
    # where compare.csv / compare.png go (default: runs_dir)
    out_dir: str | None = None


@dataclass
class ReproduceConfig:
    runs_dir: str = "runs"
    # multiplies the study's step counts (the demo data is small; 1.0 = the study's own counts)
    step_scale: float = 0.05
    # rounds trained in order; each resolves its parent by name (run:EXP/best-val.pt)
    experiments: list = field(
        default_factory=lambda: ["pretrain", "0826", "0901", "0905", "0906", "0907", "0907aux", "0908"]
    )
    # rounds predicted and scored with cell-eval
    evaluate: list = field(
        default_factory=lambda: ["0826", "0901", "0905", "0906", "0907", "0907aux", "0908"]
    )
    # extra overrides passed to every `train` (e.g. ["logger=csv"])
    train_overrides: list = field(default_factory=list)
    profile: Profile = Profile.vcc
    num_threads: int = 2
    # cross-validation: 0 = the data set's own split; K >= 2 = every perturbation held out once over K folds
    # (runs_dir/seed-S/fold-K/...; the assignment in runs_dir/folds/); each fold's chain is run per seed
    folds: int = 0
    seeds: list = field(default_factory=lambda: [0])
    # the permutation that deals perturbations into folds, and validation perturbations per fold (null: half
    # a fold)
    fold_seed: int = 0
    n_val: int | None = None
    # what the folds hold out (tahoe_ft.study.folds): unseen_perturbation (in every cell type), few_shot_context
    # (part of target_context's perturbations; each trains in another cell type), zero_shot_context
    # (target_context whole: only its controls are seen) or unseen_combination ('A+B' whose singles train)
    regime: Regime = Regime.unseen_perturbation
    # the cell type of the context regimes (and, for unseen_combination, the one whose combinations are dealt);
    # null: the cell type with most perturbations that another cell type also has (ties: most perturbations,
    # then name); for unseen_combination null deals every cell type's
    target_context: str | None = None
    # the demo's generator seeds (data.demo.seed): each is its own data set with its own folds
    # (runs_dir/data-D/...), all pooled in compare.csv; empty: the data set as configured
    data_seeds: list = field(default_factory=list)
    # after each chain, train it again on training + validation perturbations, each round for the step count
    # its validation chose (run.json's best_step) and from its parent's refit, then predict and score those
    # rounds (`<chain>/refit/`; over splits: `runs_dir/refit/compare.csv`)
    refit: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


class SweepObjective(StrEnum):
    val_loss = "val_loss"
    val_score = "val_score"


class PrunerName(StrEnum):
    median = "median"
    halving = "halving"
    none = "none"


@dataclass
class SweepSpace:
    """A search space, `configs/sweep/NAME.yaml` (`+sweep=NAME`); the grammar: `tahoe_ft.search`."""

    # the study's name: its folder runs_dir/sweeps/NAME and the Optuna study name (default: the file's name)
    name: str | None = None
    # the round(s) a trial trains, in order; each resolves its parent by name, as reproduce does
    rounds: list = field(default_factory=list)
    # fixed training overrides (Hydra syntax) of every round of every trial
    overrides: list = field(default_factory=list)
    # training key -> "float(lo, hi)" | "logfloat(lo, hi)" | "int(lo, hi)" | "int(lo, hi, step)" | "choice(a, ...)"
    params: dict = field(default_factory=dict)


@dataclass
class SweepConfig:
    # the search space: +sweep=NAME (configs/sweep/NAME.yaml)
    sweep: SweepSpace | None = None
    # finished trials (complete + pruned) the study ends with, counted over every run of the command
    n_trials: int = 20
    # validation folds as reproduce folds=K deals them (0: the data set's own split); fold_seed / n_val as there
    folds: int = 4
    fold_seed: int = 0
    n_val: int | None = None
    # the final test perturbations, drawn (fold_seed) before the search and never a fold's validation ones;
    # only final=true scores them. null = one fold's share: perturbations // (folds + 1)
    n_test: int | None = None
    # what the folds hold out, and the target cell type, as reproduce regime= / target_context= (there, n_test
    # counts the regime's dealt names; zero_shot_context tests target_context whole and ignores it)
    regime: Regime = Regime.unseen_perturbation
    target_context: str | None = None
    # val_loss: mean over folds of the last round's validation loss at its best-val.pt step, in a form that
    # does not depend on model.cell_set_len (the unbiased energy distance, val/unbiased_loss; mse as is),
    # minimised; val_score: cell-eval's avg_score of the last round's prediction of the validation
    # perturbations, mean over folds (maximised)
    objective: SweepObjective = SweepObjective.val_loss
    # an Optuna storage URL (any SQLAlchemy URL); null = sqlite:///<runs_dir>/sweeps/<NAME>/study.db
    storage: str | None = None
    # the training seed of every trial, and the sampler's (TPE) unless sampler_seed is set
    seed: int = 0
    sampler_seed: int | None = None
    # pruning from the validation losses a trial logs: median (Optuna's MedianPruner), halving
    # (SuccessiveHalvingPruner) or none; trials before pruning starts, and reported steps before it prunes
    pruner: PrunerName = PrunerName.median
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0
    # seconds between a running trial's heartbeats: a trial silent for 4x this long is failed by the next worker
    heartbeat_s: int = 60
    # after the study: train the best recipe on the folds and score it once on the final test perturbations
    # (reproduce, into runs_dir/sweeps/NAME/final/look-N/); recorded in the study (when, commit, trial)
    final: bool = False
    # final=true once more on a study whose test set was already scored (each look is recorded and counted)
    final_again: bool = False
    step_scale: float = 0.05
    # the base model of the first round (init_from: ${pretrained}); run:EXP/FILE resolves under runs_dir
    pretrained: str | None = "run:pretrain/best-val.pt"
    # extra overrides of every round (not part of the recipe: e.g. ["logger=csv"])
    train_overrides: list = field(default_factory=list)
    runs_dir: str = "runs"
    # objective=val_score and final=true: cell-eval's profile and threads
    profile: Profile = Profile.vcc
    num_threads: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ExportConfig:
    # default: pred.h5ad of the newest predicted run (of `exp`, if set)
    pred: str | None = None
    run_dir: str | None = None
    exp: str | None = None
    runs_dir: str = "runs"
    # the evaluator's gene list (header-less CSV; 18,080 genes for VCC); default: pred.h5ad's var_names
    gene_list: str | None = None
    # default: <run>/submission.prep.vcc (vcc), <run>/submission.vcc2026.h5ad (vcc2026)
    out: str | None = None
    # vcc: the 2025 submission (cell-eval prep of pred.h5ad, log1p). vcc2026: the 2026 upload file of
    # pred_counts.h5ad (predict output=counts): one .h5ad, obs target_gene and context (the cell type), exactly
    # cells_per_pert cells per perturbation, no controls, the gene list's genes in order, integer counts, CSR;
    # checked by tahoe-ft and, when installed, by vcc-cli's own validation. `vcc prep` packs it for upload
    format: ExportFormat = ExportFormat.vcc
    cells_per_pert: int = 400
    # a perturbation with fewer predicted cells than cells_per_pert: every cell once, the rest drawn with
    # replacement; with fewer than min_cells it is refused
    min_cells: int = 10
    seed: int = 0


@dataclass
class ExportStateConfig:
    # the tahoe-ft checkpoint: a bare file name in <run_dir>/checkpoints/, a path or run:EXP/FILE
    ckpt: str = "best-val.pt"
    run_dir: str | None = None
    exp: str | None = None
    runs_dir: str = "runs"
    # the upstream run folder to write (must not exist); default: <run_dir>/state-export
    out: str | None = None


@dataclass
class CheckConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class DemoCheckConfig:
    # generator seeds: the demo is generated (or reused from paths.data_cache) once per seed; >= 2 for a spread
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    # the demo's size (as data.demo.* of the other commands); its seed comes from `seeds`, so leave demo.seed
    demo: DemoConfig = field(default_factory=DemoConfig)
    # the figures as JSON (written atomically)
    out: str = "runs/demo-check.json"
    # cell-eval's files, one folder per seed; null = beside `out` (runs/demo-check/)
    work_dir: str | None = None
    num_threads: int = 2
    # score each cell type separately and average, as eval does
    per_cell_type: bool = True
    paths: PathsConfig = field(default_factory=PathsConfig)


# -- checking values against the schema ---------------------------------------------------------------------


def config_error(exc: OmegaConfBaseException) -> UserError:
    """One line naming the key (an enum's message lists the allowed values)."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    return UserError(f"config error at '{key}': {msg}; check the spelling in configs/ or on the command line")


def validate(cfg: DictConfig | dict, schema: type) -> DictConfig:
    """Merge `cfg` into the structured `schema`; unknown keys or bad types become a UserError. Side-effect free:
    the embedded data sets a config names are made where they are opened (`tahoe_ft.datasets.ensure_files`)."""
    base = OmegaConf.structured(schema)
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    try:
        merged = OmegaConf.merge(base, plain)
        OmegaConf.resolve(merged)  # interpolations now, once, not mid-run (paths only: no data written)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None
    OmegaConf.set_struct(merged, True)
    return merged


def checked(cfg: T) -> T:
    """A config dataclass built in Python (not composed), validated as composition validates it: a value of the
    wrong type or outside an option's fixed set is one line naming the key, as on the command line."""
    try:
        return OmegaConf.to_object(OmegaConf.structured(cfg))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


def to_object(cfg: DictConfig) -> Any:
    """A validated config as its schema's dataclass (what the Python API takes)."""
    return OmegaConf.to_object(cfg)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or DictConfig) as plain, resolved python containers: what a run saves."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    # enum_to_str: an enum option is saved as its plain string (run config YAML, checkpoints, JSON)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]
