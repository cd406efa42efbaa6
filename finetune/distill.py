"""Knowledge distillation (``distill.teacher=RUN``): the student trains on

    alpha * soft-target loss(student, teacher) + (1 - alpha) * task loss

where the soft-target loss is KL(softmax(t/T) || softmax(s/T)) * T^2 for single-label
classification, BCE-with-logits of s/T against sigmoid(t/T) * T^2 for multi-label, and the MSE
between the outputs for regression. The teacher's logits are computed once, before training, over
the training split and stored with it as a ``teacher_logits`` column (cached by ``datasets`` with
the split); with data.long_text=window, over each training window's text. Evaluation splits get
none, so evaluation reports the task loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from finetune.config import DataConfig, DistillConfig, FinetuneError
from finetune.data import TEACHER_LOGITS
from finetune.tasks import get_task, model_task

logger = logging.getLogger(__name__)

_LOGITS_VERSION = 1  # part of the cache fingerprint: bump when the computation changes


class DistillError(FinetuneError):
    """A teacher that cannot teach this run (missing, other labels, other task)."""


@dataclass
class Teacher:
    """A checked teacher: its model folder and what finetune.predict would read from it."""

    ref: str  # distill.teacher as given
    model_dir: str
    task: str
    max_length: Optional[int]
    batch_size: int

    def fingerprint(self) -> List:
        """Identifies the teacher's weights (path, size and time of every file) for the cache."""
        files = sorted(p for p in Path(self.model_dir).iterdir() if p.is_file())
        return [str(Path(self.model_dir).resolve()), self.max_length,
                [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]  # fmt: skip


def check_teacher(cfg: DistillConfig, names: List[str], task: str, data: DataConfig) -> Teacher:
    """The teacher of ``distill.teacher``, checked against this run's labels and task before
    anything is written. Raises DistillError naming the problem and the fix."""
    from transformers import AutoConfig

    from finetune.backends import ONNX_FILE, has_torch_weights
    from finetune.predict import PredictError, resolve_model_dir

    ref = cfg.teacher
    try:
        model_dir, meta = resolve_model_dir(str(Path(ref).expanduser()))
    except PredictError:
        model_dir, meta = None, {}
    if model_dir is None or not Path(model_dir).is_dir():
        raise DistillError(
            f"distill.teacher='{ref}' holds no model (no model/ folder, config.json or adapter_config.json). "
            "Give the output_dir of a finetune run, or its model/ folder."
        )
    if not has_torch_weights(model_dir):
        onnx = " (an ONNX export: it holds model.onnx)" if (Path(model_dir) / ONNX_FILE).is_file() else ""
        raise DistillError(
            f"distill.teacher='{ref}': its model folder {model_dir} holds no PyTorch weights{onnx}, and the "
            "teacher's logits are computed with PyTorch. Give the output_dir of the run that trained the teacher, or "
            "its model/ folder (an export serves finetune.predict, not distillation)."
        )
    if "id2label" in meta:
        id2label = {int(i): n for i, n in meta["id2label"].items()}
        teacher_task = meta.get("task")
    else:
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except Exception as err:
            raise DistillError(
                f"distill.teacher='{ref}': its label names cannot be read (no finetune.json, and config.json "
                f"failed to load: {err}). Give a model folder written by finetune."
            ) from err
        id2label, teacher_task = dict(config.id2label), config.problem_type
    teacher_task = model_task(teacher_task, None, len(id2label)).name
    if teacher_task != get_task(task).name:
        raise DistillError(
            f"distill.teacher='{ref}' was trained for {teacher_task} but this run's data is {task}; a teacher's "
            "outputs only teach a student of the same task. Use a teacher trained on this data (same label "
            "column(s) and task)."
        )
    teacher_names = [id2label[i] for i in sorted(id2label)]
    if get_task(task).teacher_labels_must_match and teacher_names != list(names):
        raise DistillError(
            f"distill.teacher='{ref}' has the labels {teacher_names} but this run's data has {list(names)} (names "
            "and order must match: the teacher's logit i teaches the student's label i). Use a teacher trained "
            "on the same labels, or set data.label_names so that this run's labels match the teacher's."
        )
    if "text_pair_column" in meta and bool(meta["text_pair_column"]) != bool(data.text_pair_column):
        raise DistillError(
            f"distill.teacher='{ref}' was trained on {'text pairs' if meta['text_pair_column'] else 'single texts'} "
            f"but this run reads {'pairs' if data.text_pair_column else 'single texts'}; set data.text_pair_column "
            "as the teacher had it."
        )
    return Teacher(ref=ref, model_dir=model_dir, task=task, max_length=meta.get("max_length") or data.max_length,
                   batch_size=int(meta.get("eval_batch_size") or 64))  # fmt: skip


def add_teacher_logits(train, teacher: Teacher, data: DataConfig, tokenizer, device=None):
    """``train`` (raw rows with their text) plus a ``teacher_logits`` column: the teacher's logits
    for each row, from its own tokenizer and max_length through finetune's one preprocessing path
    (predict.encoded_batches -> data.encode_texts). With data.long_text=window the student trains on
    windows, and each gets the teacher's logits of its own text: the row holds the logits of each
    of its windows, cut by the student's ``tokenizer`` as training cuts them (windows.window_texts),
    and tokenization hands each window its own (data.tokenize_splits). The map has a fingerprint of
    the split and the teacher's files, so ``datasets`` caches it with the split: a file-backed
    split is computed once and read back by later runs and by the other processes of a distributed
    run; an in-memory split is computed by each process alike."""
    from datasets import List as ListFeature, Value
    from datasets.fingerprint import Hasher
    from transformers import AutoTokenizer

    from finetune.backends import TorchBackend
    from finetune.predict import encoded_batches, run_batches
    from finetune.windows import window_stride, window_texts

    text, pair = data.text_column, data.text_pair_column
    stride = window_stride(data)
    runner, teacher_tokenizer = None, None

    def logits_of(batch):
        nonlocal runner, teacher_tokenizer
        if runner is None:  # loaded only when the cache misses
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher.model_dir)
            runner = TorchBackend(teacher.model_dir, device="cpu" if device is None else device)
        texts = [str(t) for t in batch[text]]
        pairs = [str(p) for p in batch[pair]] if pair else None
        if stride is None:
            pieces, owners = list(zip(texts, pairs or [None] * len(texts))), None
        else:
            pieces, owners = window_texts(tokenizer, texts, pairs, data.max_length, stride)
        rows = [{"text": t, "pair": p} for t, p in pieces]
        batches = encoded_batches(teacher_tokenizer, rows, "text", "pair" if pair else None, teacher.max_length,
                                  teacher.batch_size)  # fmt: skip
        logits = run_batches(runner, batches, len(rows)).astype("float32").tolist()
        if owners is None:
            return {TEACHER_LOGITS: logits}
        per_row = [[] for _ in texts]
        for owner, window in zip(owners, logits):
            per_row[owner].append(window)
        return {TEACHER_LOGITS: per_row}

    features = train.features.copy()
    features[TEACHER_LOGITS] = ListFeature(Value("float32"))
    windows = None
    if stride is not None:
        features[TEACHER_LOGITS] = ListFeature(features[TEACHER_LOGITS])
        windows = [data.max_length, stride, Hasher.hash(tokenizer)]
    fingerprint = Hasher.hash([train._fingerprint, teacher.fingerprint(), text, pair, windows, _LOGITS_VERSION])
    logger.info("Distillation: teacher logits of %d training rows%s from %s.", len(train),
                " (of each of their windows)" if stride is not None else "", teacher.model_dir)  # fmt: skip
    # Chunks of whole teacher batches, sorted by length inside each chunk to cut padding.
    return train.map(logits_of, batched=True, batch_size=16 * teacher.batch_size, features=features,
                     new_fingerprint=fingerprint, desc="Teacher logits")  # fmt: skip


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """How far the student's outputs are from the teacher's (see the module docstring)."""
    return get_task(task).soft_target_loss(student, teacher, temperature)


def distillation_loss(task_loss: Callable, task: str, alpha: float, temperature: float) -> Callable:
    """``loss(logits, labels, teacher_logits=None)``: the distillation objective for training
    batches (which carry the teacher's logits), the task loss alone where there are none (evaluation)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        if teacher_logits is None:
            return task_loss(logits, labels)
        soft = soft_target_loss(logits, teacher_logits, task, temperature)
        return alpha * soft + (1 - alpha) * task_loss(logits, labels)

    return loss
