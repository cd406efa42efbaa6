"""The task interface: everything that differs between single-label classification, multi-label
classification, regression (and later token classification) is decided by one ``Task`` object,
so that the rest of finetune asks the task instead of branching on the problem type.

A task is identified by its Hugging Face ``problem_type`` string (``Task.name``): it is what
``finetune.json``'s ``task`` and ``config.problem_type`` of a saved model hold, and the string
the public helpers (``scores_from_logits(logits, task)``, ``build_loss(cfg, task, ...)``) take.
``finetune.tasks.get_task`` turns it into the object.

This module stays light (numpy and the config only): ``finetune.validation`` asks tasks before
anything heavy is imported. torch, datasets and transformers are imported where a method needs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from finetune.config import DataConfig, LossName, TaskType

if TYPE_CHECKING:
    from datasets import Dataset

LABELS = "labels"  # the column name Hugging Face models take their targets from
# The most confused label pairs a label audit reports.
TOP_CONFUSED = 10


@dataclass
class LabelIssues:
    """A label audit's verdict (audit.label_issues, finetune.audit), computed by cleanlab from each
    row's out-of-fold outputs: per row whether its given label looks wrong, cleanlab's label quality
    score (0..1, lower: more likely wrong), the given and the suggested label as text; overall the
    estimated share of wrong labels (counted in ``noise_unit``: rows, words or (row, label)
    decisions), the most confused pairs (given, likely_true, rows: estimated count) and, for the
    plot, the estimated noise matrix with its row and column names and title (None: no classes)."""

    flagged: np.ndarray
    quality: np.ndarray
    given: List[str]
    suggested: List[str]
    noise_rate: float
    noise_unit: str
    confused: List[dict]
    noise_matrix: Optional[Tuple[np.ndarray, List[str], List[str], str]] = None


class Task(ABC):
    """What a task decides. Subclasses set the class attributes and implement the abstract methods;
    the defaults below are those of the sequence tasks (one label or value per text)."""

    # Hugging Face's problem_type: the task's name in finetune.json, model configs and messages.
    name: str
    # The value of the config key task=... that asks for this task.
    choice: TaskType
    # The transformers / PEFT head classes and PEFT's task type.
    head: str = "AutoModelForSequenceClassification"
    peft_head: str = "AutoPeftModelForSequenceClassification"
    peft_task_type: str = "SEQ_CLS"
    # Losses that fit the task; the first is loss=auto.
    losses: Tuple[LossName, ...] = ()
    # A sensible metric list for this task (the config's default is that of single-label
    # classification), and the metric early_stopping.metric=null (the default) selects the best model by.
    default_metrics: Tuple[str, ...] = ()
    early_stopping_metric: str = "loss"
    # The model card: model-index task type / name, the tag, the pipeline tag.
    card_task_type: str = "text-classification"
    card_task_name: str = "Text Classification"
    card_tag: str = "text-classification"
    pipeline_tag: str = "text-classification"
    # One class per row: stratified splits, sub-samples and folds, and the class checks apply.
    has_classes: bool = False
    # data.sampler=balanced has classes to balance.
    balances: bool = True
    # The labels may come as several 0/1 columns (data.label_columns).
    reads_label_columns: bool = False
    # Outputs are independent per label (sigmoid): focal loss and NLL read them so.
    sigmoid_outputs: bool = False
    # The plot of the validation predictions (finetune.plots): "confusion_matrix", "regression" or None.
    validation_plot: Optional[str] = None
    # A distillation teacher's label names must equal the student's, in order.
    teacher_labels_must_match: bool = True
    # After temperature scaling the decision threshold is tuned again (not only mapped).
    retune_threshold_after_calibration: bool = False
    # Labels per token, padded by the collator with this id (None: one label per row).
    label_pad_id: Optional[int] = None
    # The axes of the model's logits before the labels' (the ONNX export's dynamic output axes):
    # one row per text, or per token.
    logit_axes: Tuple[str, ...] = ("batch",)

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -----------------------------------------------------------------------------------------
    # Labels
    # -----------------------------------------------------------------------------------------
    @abstractmethod
    def claims(self, train: "Dataset", cfg: DataConfig) -> bool:
        """Whether ``task=auto`` detects this task from the train split's label column(s); exactly
        one registered task claims any data."""

    def check_requested(self, train: "Dataset", cfg: DataConfig, found: "Task") -> None:
        """Raise DataError when the label column cannot hold this task's labels (``task=`` was given;
        ``found`` is what detection says)."""

    @abstractmethod
    def encode_splits(self, raw: Dict[str, "Dataset"], cfg: DataConfig) -> Tuple[List[str], Dict[str, "Dataset"]]:
        """(label names, the splits with an encoded ``labels`` column), read from the label column(s)
        as ``cfg`` names them. Raises DataError for labels that cannot be encoded."""

    def columns(self, cfg: DataConfig) -> Dict[str, str]:
        """The columns every labelled split needs, by the config key that names them."""
        wanted = {"data.text_column": cfg.text_column}
        if cfg.text_pair_column:
            wanted["data.text_pair_column"] = cfg.text_pair_column
        if cfg.label_columns:
            wanted.update({f"data.label_columns[{i}]": c for i, c in enumerate(cfg.label_columns)})
        else:
            wanted["data.label_column"] = cfg.label_column
        return wanted

    def check_split(self, ds: "Dataset", split: str, cfg: DataConfig) -> None:
        """Raise DataError for a row the task cannot read (missing text or label, ...)."""
        from finetune.data_checks import check_values

        check_values(ds, split, cfg, need_label=True)

    def config_problems(self, cfg) -> List[str]:
        """What of a composed FinetuneConfig this task cannot do, one paragraph each (checked when
        task= names the task, and again once task=auto has detected it, before anything is written)."""
        return []

    def label_array(self, column: Sequence[Any]) -> np.ndarray:
        """A split's ``labels`` column as the sampling and split code takes it (one entry per row)."""
        return np.asarray(column)

    def tokenize(self, splits: Dict[str, "Dataset"], tokenizer, cfg: DataConfig, names: Sequence[str]):
        """The task's own tokenization: (tokenized splits, per evaluated split what its prediction
        table needs), or None to encode the text column(s) as every sequence task does
        (finetune.data.tokenize_splits)."""
        return None

    def align_labels(self, labels: Sequence[Any], word_ids: Sequence[Optional[int]]) -> Any:
        """The target of one tokenized sequence from its row's labels and the word each token comes
        from (None: a special token). A sequence task has one target per text, so it is the row's."""
        return labels

    @abstractmethod
    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """Rows per class or positive rows per label (empty: the labels are not classes)."""

    def stratify_labels(self, labels: np.ndarray) -> Optional[np.ndarray]:
        """What splits, sub-samples and folds stratify by (None: drawn at random)."""
        return np.asarray(labels) if self.has_classes else None

    def row_weights(self, labels: np.ndarray, num_labels: int, power: float) -> np.ndarray:
        """Unnormalised draw weights of data.sampler=balanced. Raises DataError when there are no
        classes to balance."""
        raise NotImplementedError

    def drawn_shares(self, labels: np.ndarray, weights: np.ndarray, num_labels: int) -> np.ndarray:
        """Each class's expected share of the draws under ``weights``."""
        return np.asarray(weights) @ (np.asarray(labels) > 0.5)

    def references(self, labels: np.ndarray) -> np.ndarray:
        """Gold labels as the metric modules take them."""
        return np.asarray(labels).astype(np.int64)

    # -----------------------------------------------------------------------------------------
    # Model head
    # -----------------------------------------------------------------------------------------
    def model_class(self):
        """The ``transformers`` Auto class that builds this task's head."""
        import transformers

        return getattr(transformers, self.head)

    def has_head(self, architectures: Sequence[str]) -> bool:
        """Whether a model config's ``architectures`` (e.g. ["BertForTokenClassification"]) name this
        task's head class."""
        suffix = self.head.replace("AutoModel", "", 1)  # ForSequenceClassification, ...
        return any(a.endswith(suffix) for a in architectures)

    def default_for_outputs(self, num_labels: int) -> bool:
        """Whether a model that names no problem type is read as this task, from its number of
        outputs (as transformers reads it)."""
        return False

    def peft_model_class(self):
        import peft

        return getattr(peft, self.peft_head)

    # -----------------------------------------------------------------------------------------
    # Loss
    # -----------------------------------------------------------------------------------------
    def resolve_loss_name(self, cfg) -> LossName:
        """loss=auto -> the task's default; any other name must fit the task (LossError)."""
        from finetune.losses import LossError

        if cfg.name == LossName.auto:
            return self.losses[0]
        if cfg.name not in self.losses:
            raise LossError(
                f"loss={cfg.name.value} does not fit the task ({self.name}); valid: "
                f"{', '.join(v.value for v in self.losses)} (or auto)."
            )
        return cfg.name

    def loss_inputs(self, logits, labels):
        """The logits and labels as the loss takes them (token tasks flatten the tokens)."""
        return logits, labels

    @abstractmethod
    def soft_target_loss(self, student, teacher, temperature: float):
        """Distillation: how far the student's outputs are from the teacher's (torch tensors)."""

    # -----------------------------------------------------------------------------------------
    # From logits to scores, predictions and the rows written from them
    # -----------------------------------------------------------------------------------------
    @abstractmethod
    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities (or values) from logits, float64."""

    @abstractmethod
    def predictions(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Decisions from scores."""

    def uses_threshold(self, num_labels: int) -> bool:
        """Whether a decision threshold applies (and eval.tune_threshold can tune it)."""
        return False

    @abstractmethod
    def label_text(self, value, id2label: Dict[int, str]) -> str:
        """A gold or predicted label as prediction tables write it."""

    def probability_fields(self, scores_row: np.ndarray, id2label: Dict[int, str]) -> Dict[str, str]:
        """The prob_<label> columns of a prediction-table row."""
        return {f"prob_{id2label[j]}": f"{p:.6f}" for j, p in enumerate(scores_row)}

    def predict_record(self, prediction, scores_row: np.ndarray, id2label: Dict[int, str], decimals: int) -> Dict[str, Any]:
        """What a finetune.predict output row holds besides its text(s)."""
        record: Dict[str, Any] = {"prediction": self.label_text(prediction, id2label)}
        record.update({f"prob_{id2label[j]}": round(float(p), decimals) for j, p in enumerate(scores_row)})
        return record

    # finetune.predict and finetune.serve hand the input rows as they come to ``row_predictor``
    # (no text-column checks of their own).
    reads_own_rows: bool = False

    def row_predictor(self, predictor):
        """finetune.predict's (and serve's) records from input rows when the task reads them itself,
        built once on a loaded ``finetune.predict.Predictor`` (its tokenizer, backend, label names,
        max length, batch size): a callable ``(rows, text_column) -> records``. None: the text path,
        one ``predict_record`` per text."""
        return None

    def export_problem(self) -> Optional[str]:
        """Why finetune.export cannot export and check this task's models (None when it can)."""
        return None

    def export_check(self, tokenizer, meta: dict):
        """What finetune.export checks an export on and how it compares it with PyTorch
        (finetune.export_check): one decision per text, under the run's threshold."""
        from finetune.export_check import TextCheck

        return TextCheck(self, tokenizer, meta)

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """Per row, whether two sets of predictions (an export and PyTorch) decide the same."""
        return np.asarray(reference) == np.asarray(candidate)

    @abstractmethod
    def pool(self, flat: np.ndarray, owner: np.ndarray, n: int, how: str) -> np.ndarray:
        """data.long_text=window: one row of logits per document (``n`` of them) from its windows'
        (``flat``, each window's document in ``owner``), pooled ``how`` (mean / max)."""

    def pool_outputs(self, logits: np.ndarray, labels: np.ndarray, documents: np.ndarray, how: str):
        """data.long_text=window in evaluation: (logits, labels) with one row per document from its
        windows' rows (``documents``: each window's document; windows in dataset order). Sequence
        tasks pool the logits (``pool``) and keep the label of the document's first window."""
        from finetune.windows import pool_windows

        pooled, first = pool_windows(logits, documents, self.name, how)
        return pooled, np.asarray(labels)[first]

    def batch_outputs(self, logits, labels, accelerator):
        """One evaluation batch's (logits, labels) made gatherable across processes."""
        return logits, labels

    def join_outputs(self, parts: List[Any], pad_value: float):
        """The gathered evaluation batches as one tensor (rows in batch order)."""
        import torch

        return torch.cat(parts)

    def write_predictions(self, pred_dir, split: str, output, data, threshold: float) -> None:
        """predictions/<split>.*: the prediction table of an evaluated split."""
        from finetune.outputs import write_prediction_table

        write_prediction_table(pred_dir / f"{split}.tsv", output, data, split, threshold)

    # -----------------------------------------------------------------------------------------
    # Metrics
    # -----------------------------------------------------------------------------------------
    def compute_metrics(self, predictions: np.ndarray, references: np.ndarray, id2label: Optional[Dict[int, str]]):
        """All metrics of the task at once (None: the configured metric modules are computed one by one)."""
        return None

    @abstractmethod
    def metric_names(self, known: Sequence[str]) -> List[str]:
        """Which of the bundled metric names fit the task (sorted)."""

    def metric_average(self, num_labels: int) -> str:
        """The average of f1 / precision / recall named without a suffix."""
        return "macro"

    def metric_config(self, module_name: str, num_labels: int, bundled: bool) -> Optional[str]:
        """The evaluate config name a metric module is loaded with."""
        return None

    def ranking_scores(self, scores: np.ndarray, num_labels: int) -> np.ndarray:
        """What roc_auc ranks."""
        return scores

    # -----------------------------------------------------------------------------------------
    # Calibration (finetune.calibration)
    # -----------------------------------------------------------------------------------------
    def calibration_problem(self, data: Optional[DataConfig] = None) -> Optional[str]:
        """Why eval.calibrate=temperature cannot apply (None when it can)."""
        return None

    def calibration_targets(self, labels):
        """The labels as the NLL takes them (a torch tensor)."""
        return labels.long()

    def nll(self, logits, targets):
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets)

    def confidence_and_outcome(self, scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """What each probability claims and whether it came true (reliability bins, ECE)."""
        return scores.max(axis=-1), (scores.argmax(axis=-1) == labels.astype(np.int64)).astype(np.float64)

    reliability_kind: str = "top-label confidence"

    # -----------------------------------------------------------------------------------------
    # Label audit (audit.label_issues, finetune.audit)
    # -----------------------------------------------------------------------------------------
    # The task's default for audit.flag_below, the cut on P(given label is right) below which its
    # audit flags a row; None: the task flags by cleanlab's rules and takes no cut.
    audit_flag_below: Optional[float] = None

    @abstractmethod
    def label_issues(self, logits: Sequence[np.ndarray], labels: Sequence[np.ndarray], id2label: Dict[int, str]) -> LabelIssues:
        """The verdict on each row from its out-of-fold logits and its given label (one entry per row,
        as evaluation returns them). A task with an ``audit_flag_below`` also takes ``flag_below=``,
        the cut (audit.flag_below), defaulting to it."""

    def audit_skill(self, logits: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Optional[Tuple[float, float]]:
        """(the out-of-fold log loss of the given labels, that of predicting every row the given
        labels' frequencies), for a task whose audit trusts the fold models' probabilities; the
        audit warns when the first is no lower. None: the task does not say."""
        return None

    def audit_text(self, row: Dict[str, Any], cfg: DataConfig) -> str:
        """A data row's text as the label audit's table shows it (a pair joined by ' [SEP] ')."""
        text = str(row[cfg.text_column])
        return f"{text} [SEP] {row[cfg.text_pair_column]}" if cfg.text_pair_column else text


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def max_pool(flat: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    pooled = np.full((n, flat.shape[1]), -np.inf)
    np.maximum.at(pooled, owner, flat)
    return pooled


def mean_pool(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    pooled = np.zeros((n, values.shape[1]))
    np.add.at(pooled, owner, values)
    return pooled / np.bincount(owner, minlength=n)[:, None]


# How many rows are taken as anchors of each class (rows surely of that class) when the noise
# matrix is estimated from out-of-fold probabilities: this share of the rows, split among the
# classes by how many rows are given each (Patrini et al. 2017 take the 97th percentile of a class's
# probability rather than the single most confident row, which may itself be mislabelled).
ANCHOR_SHARE = 0.03


def anchor_noise_matrix(probs: np.ndarray, given: np.ndarray, share: float = ANCHOR_SHARE) -> np.ndarray:
    """The noise matrix ``T[g, t] = P(given label g | true label t)`` estimated from out-of-fold
    probabilities of the given labels (after Patrini et al. 2017, "Making deep neural networks robust
    to label noise: a loss correction approach"): the rows a model gives class t's highest
    probabilities are anchors of t, surely of class t, and the model's mean probabilities over them
    are column t. A class gets ``share`` x (number of classes) x (rows given it) anchors, at least one:
    3% of all rows per class when the classes are balanced, and no rows of other classes as the
    anchors of a rare one. Columns sum to 1 (each is a mean of probability distributions)."""
    k = probs.shape[1]
    matrix = np.zeros((k, k))
    counts = np.bincount(given, minlength=k)
    for t in range(k):
        anchors = np.argsort(-probs[:, t], kind="stable")[: max(1, int(round(share * k * counts[t])))]
        matrix[:, t] = probs[anchors].mean(axis=0)
    return matrix


def true_label_posterior(probs: np.ndarray, given: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """P(true label = t | text, given label) for every row and class t, from the probabilities of
    the given labels ``probs`` (what a model trained on them predicts) and the noise matrix: the
    probabilities of the true labels are ``probs`` with the noise taken out (T^-1, clipped to a
    distribution), and Bayes' rule with P(given | true) = T weighs them by how likely each true
    class is to have been given this label."""
    clean = np.clip(probs @ np.linalg.pinv(noise).T, 0.0, None)
    total = clean.sum(axis=1, keepdims=True)
    clean = np.divide(clean, total, out=np.full_like(clean, 1.0 / probs.shape[1]), where=total > 0)
    weighted = noise[given] * clean  # [row, t]: P(given | t) P(t | text)
    total = weighted.sum(axis=1, keepdims=True)
    return np.divide(weighted, total, out=np.eye(probs.shape[1])[given], where=total > 0)


def posterior_noise(given: np.ndarray, posterior: np.ndarray, names: List[str]) -> Tuple[float, List[dict]]:
    """(expected share of wrong labels, the most confused (given, likely true) pairs with their
    expected row counts) from each row's posterior over its true label."""
    k = len(names)
    joint = np.zeros((k, k))  # expected rows given i whose true label is j
    np.add.at(joint, given, posterior)
    pairs = sorted(((joint[i, j], i, j) for i in range(k) for j in range(k) if i != j), reverse=True)
    confused = [{"given": names[i], "likely_true": names[j], "rows": int(round(n))}
                for n, i, j in pairs[:TOP_CONFUSED] if round(n) >= 1]  # fmt: skip
    return float(1.0 - np.trace(joint) / max(len(given), 1)), confused


def class_noise(given: np.ndarray, probs: np.ndarray, names: List[str]) -> Tuple[float, List[dict], np.ndarray]:
    """(estimated share of wrong labels, the most confused (given, likely true) class pairs, the
    noise matrix P(given label | true label)) from cleanlab's estimate of the joint distribution of
    given and true labels."""
    from cleanlab.count import estimate_joint

    joint = estimate_joint(given, probs)  # joint[i, j]: P(given = i, true = j)
    pairs = sorted(((joint[i, j], i, j) for i in range(len(names)) for j in range(len(names)) if i != j), reverse=True)
    confused = [{"given": names[i], "likely_true": names[j], "rows": int(round(p * len(given)))}
                for p, i, j in pairs[:TOP_CONFUSED] if round(p * len(given)) >= 1]  # fmt: skip
    true = joint.sum(axis=0, keepdims=True)
    matrix = np.divide(joint, true, out=np.zeros_like(joint), where=true > 0)
    return float(1.0 - np.trace(joint)), confused, matrix
