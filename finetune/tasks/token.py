"""Token classification (NER): a tag per word. Rows hold a list of words (``data.tokens_column``)
and a list of as many tags (``data.tags_column``: strings, or ints named by a ``ClassLabel`` or
``data.label_names``) in IOB1, IOB2 or BIOES, read into IOB2 (finetune.tagging). Words become
sub-tokens with a fast tokenizer (finetune.word_windows); the first sub-token of a word carries its
tag, the others -100 (or, in training with ``data.label_all_tokens``, the tag too). Evaluation and
predictions read each word's first sub-token; the metrics are seqeval's entity-level scores."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from finetune.config import TOKEN_CLASSIFICATION, DataConfig, LossName, TaskType
from finetune.data_checks import DataError, where
from finetune.tasks.base import LABELS, LabelIssues, Task, class_noise, softmax

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

IGNORE = -100  # the label id the loss and the metrics skip (torch's CrossEntropyLoss ignore_index)
# seqeval's overall scores under the names the configured metrics use.
OVERALL = {"f1": "overall_f1", "precision": "overall_precision", "recall": "overall_recall", "accuracy": "overall_accuracy"}


class TokenClassification(Task):
    name = TOKEN_CLASSIFICATION
    choice = TaskType.token_classification
    head = "AutoModelForTokenClassification"
    peft_head = "AutoPeftModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    losses = (LossName.cross_entropy,)
    default_metrics = ("f1", "precision", "recall", "accuracy")
    # Entity F1, not token accuracy, which the many O tags inflate.
    early_stopping_metric = "f1"
    card_task_type = "token-classification"
    card_task_name = "Token Classification"
    card_tag = "token-classification"
    pipeline_tag = "token-classification"
    balances = False
    label_pad_id = IGNORE
    logit_axes = ("batch", "sequence")
    reads_own_rows = True  # raw text (entities) or word lists (tags)

    # --- labels ---------------------------------------------------------------------------------
    def claims(self, train, cfg: DataConfig) -> bool:
        from finetune.tasks.multi_label import is_list_feature

        features = train.features
        return all(c in features and is_list_feature(features[c]) for c in (cfg.tokens_column, cfg.tags_column))

    def check_requested(self, train, cfg: DataConfig, found: Task) -> None:
        if found is not self:
            raise DataError(
                f"task=token_classification needs a list of words in data.tokens_column='{cfg.tokens_column}' and a "
                f"list of as many tags in data.tags_column='{cfg.tags_column}' in every row, but the train split's "
                f"columns are {train.column_names} (and hold {found.name} data). Name the two list columns with "
                "data.tokens_column / data.tags_column, or drop task=token_classification for text classification."
            )

    def columns(self, cfg: DataConfig) -> Dict[str, str]:
        return {"data.tokens_column": cfg.tokens_column, "data.tags_column": cfg.tags_column}

    def check_split(self, ds, split: str, cfg: DataConfig) -> None:
        from finetune.tagging import check_rows

        check_rows(ds[cfg.tokens_column], ds[cfg.tags_column], where(split, cfg))

    def encode_splits(self, raw, cfg: DataConfig):
        from finetune.tagging import encode_tags, label_list, to_iob2

        scheme, iob2 = cfg.tag_scheme.value, {}
        for split in ["train"] + [s for s in raw if s != "train"]:  # the others read in train's scheme
            place = where(split, cfg)
            rows = to_iob2(tag_strings(raw[split], cfg, place), scheme, place)
            if rows.repairs.count:
                logger.warning(rows.repairs.message(place))
            scheme, iob2[split] = rows.scheme, rows.tags
        names = label_list(iob2["train"])
        if len(names) < 2:
            raise DataError(f"{where('train', cfg)}: every tag in data.tags_column='{cfg.tags_column}' is O; token "
                            "classification needs tagged entities to learn from.")  # fmt: skip
        label2id = {n: i for i, n in enumerate(names)}
        out = {}
        for split, ds in raw.items():
            ids = encode_tags(iob2[split], label2id, where(split, cfg))
            out[split] = ds.remove_columns([cfg.tags_column]).add_column(LABELS, ids)
        logger.info("Tags read as %s (data.tag_scheme=%s), written as IOB2.", scheme, cfg.tag_scheme.value)
        return names, out

    def label_array(self, column: Sequence[Any]) -> np.ndarray:
        out = np.empty(len(column), dtype=object)
        out[:] = [np.asarray(row, dtype=np.int64) for row in column]
        return out

    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        flat = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in labels]) if len(labels) else np.zeros(0, int)
        return np.bincount(flat[flat >= 0], minlength=num_labels)

    def stratify_labels(self, labels: np.ndarray) -> Optional[np.ndarray]:
        return None

    def row_weights(self, labels: np.ndarray, num_labels: int, power: float) -> np.ndarray:
        raise DataError("data.sampler=balanced draws rows by their class, but a token-classification row holds many "
                        "tags; use data.sampler=random (and loss.class_weights=auto to weigh rare tags).")  # fmt: skip

    def references(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels).astype(np.int64)

    def config_problems(self, cfg) -> List[str]:
        from finetune.config import Calibrate

        d, problems = cfg.data, []
        if cfg.distill.teacher:
            problems.append(
                "distill.teacher with task=token_classification is not supported yet (the teacher's logits would be "
                "needed per sub-token); train the smaller model directly (model.keep_layers works)."
            )
        if any((d.augment.delete, d.augment.swap, d.augment.mask)):
            problems.append("data.augment with task=token_classification is not supported: deleting or swapping words "
                            "would move their tags; set data.augment.* to 0.")  # fmt: skip
        if cfg.eval.calibrate != Calibrate.none:
            problems.append(self.calibration_problem(d))
        return problems

    def calibration_problem(self, data: Optional[DataConfig] = None) -> Optional[str]:
        return ("eval.calibrate=temperature with task=token_classification is not supported: entity predictions "
                "take the most probable tag per word, which a temperature does not change. Set eval.calibrate=none.")  # fmt: skip

    # --- tokenization ---------------------------------------------------------------------------
    def tokenize(self, splits, tokenizer, cfg: DataConfig, names: Sequence[str]):
        """Sentences as windows of whole words (finetune.word_windows). Training labels every word
        of every window; evaluation labels each word once, in the window where it has most context,
        and with data.long_text=window each window carries its sentence (``pool_outputs``)."""
        from datasets import Dataset, DatasetDict

        from finetune.tagging import continuation_ids
        from finetune.windows import DOCUMENT, window_stride
        from finetune.word_windows import encode_words, evaluation_labels, scored_words, window_labels

        check_fast(tokenizer)
        continuation, stride = continuation_ids(names), window_stride(cfg)
        out, tables, encoded = {}, {}, {}
        for split, ds in splits.items():
            words, labels = ds[cfg.tokens_column], ds[LABELS]
            # One dataset given as two splits (cross-validation's pool) is encoded once.
            seen = id(ds) in encoded
            windows = encoded[id(ds)] if seen else encode_words(tokenizer, words, cfg.max_length, stride)
            encoded[id(ds)] = windows
            if windows.truncated_words and not seen:
                logger.warning(
                    "%s: %d word(s) of %d sentence(s) lie past data.max_length=%d tokens; they are not trained on "
                    "and are predicted O (raise data.max_length, or set data.long_text=window to read them).",
                    where(split, cfg), windows.truncated_words, windows.truncated_sentences, cfg.max_length)  # fmt: skip
            if windows.windowed_sentences and not seen:
                logger.info("%s: %d sentence(s) longer than data.max_length=%d tokens read as %d windows in all.",
                            where(split, cfg), windows.windowed_sentences, cfg.max_length, len(windows))  # fmt: skip
            columns = {k: list(v) for k, v in windows.encoding.items()}
            if split == "train":
                columns[LABELS] = window_labels(windows, labels, cfg.label_all_tokens, continuation)
            else:
                columns[LABELS] = evaluation_labels(windows, labels)
                # With windows the evaluated logits are one row per scored word (pool_outputs).
                word_ids = scored_words(windows) if stride is not None else windows.word_ids
                tables[split] = list(zip(words, labels, word_ids))
            if stride is not None:
                columns[DOCUMENT] = windows.sentence
            out[split] = Dataset.from_dict(columns)
        return DatasetDict(out), tables

    # --- loss -----------------------------------------------------------------------------------
    def loss_inputs(self, logits, labels):
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)

    def soft_target_loss(self, student, teacher, temperature: float):
        raise NotImplementedError("distillation is refused for token classification (config_problems)")

    # --- predictions ----------------------------------------------------------------------------
    def scores(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64))

    def predictions(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return scores.argmax(axis=-1)

    def label_text(self, value, id2label: Dict[int, str]) -> str:
        return id2label[int(value)]

    def pool(self, flat, owner, n, how):
        raise NotImplementedError("token windows are joined word by word (pool_outputs), not pooled")

    def pool_outputs(self, logits, labels, documents, how):
        """One row per sentence: the logits and labels of its scored words, in order, taken from
        its windows' labelled tokens (word_windows.evaluation_labels labels each word in one
        window only); rows padded with -100 labels to the longest sentence."""
        _, owner = np.unique(np.asarray(documents), return_inverse=True)
        keep = np.asarray(labels) != IGNORE
        parts: List[List[int]] = [[] for _ in range(owner.max() + 1 if len(owner) else 0)]
        for k, s in enumerate(owner):  # windows in dataset order: a sentence's windows in order
            parts[s].append(k)
        rows = [(np.concatenate([logits[k][keep[k]] for k in ks]), np.concatenate([labels[k][keep[k]] for k in ks]))
                for ks in parts]  # fmt: skip
        width = max((len(y) for _, y in rows), default=0)
        out_logits = np.zeros((len(rows), width, logits.shape[-1]), dtype=logits.dtype)
        out_labels = np.full((len(rows), width), IGNORE, dtype=np.asarray(labels).dtype)
        for s, (x, y) in enumerate(rows):
            out_logits[s, : len(y)], out_labels[s, : len(y)] = x, y
        return out_logits, out_labels

    def row_predictor(self, predictor):
        from finetune.token_predict import TokenRows

        return TokenRows(predictor)

    def export_check(self, tokenizer, meta: dict):
        from finetune.token_export import WordCheck

        return WordCheck(self, tokenizer, meta)

    def batch_outputs(self, logits, labels, accelerator):
        # Batches are as long as their longest row, which differs between processes.
        return accelerator.pad_across_processes(logits, dim=1), accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE)

    def join_outputs(self, parts, pad_value: float):
        import torch
        import torch.nn.functional as F

        width = max(p.shape[1] for p in parts)
        return torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=pad_value) for p in parts])

    def word_predictions(self, logits: np.ndarray, word_ids: Sequence[Optional[int]], words: int) -> List[int]:
        """The predicted tag id of each word of one row: the argmax at its first sub-token; a word
        no token holds (past max_length) is O (id 0, label_list puts O first)."""
        best, seen = [0] * words, set()
        for p, w in enumerate(word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                best[w] = int(np.argmax(logits[p]))
        return best

    def write_predictions(self, pred_dir, split: str, output, data, threshold: float) -> None:
        """predictions/<split>.jsonl: per sentence its words, gold and predicted tags."""
        names = data.id2label
        with open(pred_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for (words, gold, word_ids), logits in zip(data.texts[split], output.logits):
                predicted = self.word_predictions(logits, word_ids, len(words))
                row = {"words": list(words), "gold": [names[int(g)] for g in gold], "predicted": [names[p] for p in predicted]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # --- metrics --------------------------------------------------------------------------------
    def metric_names(self, known: Sequence[str]) -> List[str]:
        return sorted(OVERALL)

    def compute_metrics(self, predictions, references, id2label):
        from finetune.metrics import seqeval_scores

        gold, predicted = [], []
        for pred_row, ref_row in zip(predictions, references):
            keep = ref_row != IGNORE
            gold.append([id2label[int(t)] for t in ref_row[keep]])
            predicted.append([id2label[int(t)] for t in pred_row[keep]])
        return seqeval_scores(predicted, gold)

    # --- label audit ----------------------------------------------------------------------------
    def label_issues(self, logits, labels, id2label: Dict[int, str]) -> LabelIssues:
        """Sentence-level issues: a sentence is flagged when cleanlab finds a word in it whose tag
        looks wrong; its quality is that of its worst word. Each word is read at its first sub-token."""
        from cleanlab.token_classification.filter import find_label_issues
        from cleanlab.token_classification.rank import get_label_quality_scores

        names = [id2label[i] for i in range(len(id2label))]
        words = [np.asarray(row) != IGNORE for row in labels]
        given = [np.asarray(row)[keep].astype(np.int64) for row, keep in zip(labels, words)]
        probs = [softmax(np.asarray(row, dtype=np.float64)[: len(keep)][keep]) for row, keep in zip(logits, words)]
        scored = [i for i, g in enumerate(given) if len(g)]  # a sentence with no word left to read is not judged
        flagged, quality = np.zeros(len(given), dtype=bool), np.ones(len(given))
        if scored:
            issues = find_label_issues([given[i].tolist() for i in scored], [probs[i] for i in scored])
            flagged[[scored[s] for s, _ in issues]] = True
            quality[scored] = get_label_quality_scores([given[i].tolist() for i in scored], [probs[i] for i in scored])[0]
        rate, confused, matrix = class_noise(np.concatenate(given), np.concatenate(probs), names) if scored else (0.0, [], None)
        return LabelIssues(
            flagged=flagged,
            quality=quality,
            given=[" ".join(names[t] for t in g) for g in given],
            suggested=[" ".join(names[t] for t in p.argmax(axis=-1)) for p in probs],
            noise_rate=rate,
            noise_unit="words",
            confused=confused,
            noise_matrix=None if matrix is None else (matrix, names, names, "Estimated noise matrix P(given tag | true tag): rows given, columns true"),
        )

    def audit_text(self, row, cfg: DataConfig) -> str:
        return " ".join(map(str, row[cfg.tokens_column]))


def check_fast(tokenizer) -> None:
    """Word alignment needs a fast tokenizer's ``word_ids``."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"token classification needs a fast tokenizer (it maps sub-tokens to words), but "
            f"{type(tokenizer).__name__} is a slow one. Use a model with a tokenizer.json, or convert its tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...))."
        )


def tag_strings(ds: "Dataset", cfg: DataConfig, place: str) -> List[List[str]]:
    """The tags of a split as strings: ClassLabel ids by their names, other ints by data.label_names."""
    from finetune.tagging import names_to_tags

    feature = getattr(ds.features[cfg.tags_column], "feature", None)
    rows = ds[cfg.tags_column]
    names = getattr(feature, "names", None) or cfg.label_names
    if any(not isinstance(t, str) for row in rows for t in row):
        if not names:
            raise DataError(
                f"{place}: data.tags_column='{cfg.tags_column}' holds integer tag ids without names; name them in id "
                "order with data.label_names=[O,B-PER,I-PER,...], or write the tags as strings."
            )
        return names_to_tags(rows, names, place)
    return [list(r) for r in rows]
