"""Batching: length-grouped, seeded, epoch-aware batch sampling, padding collators (with the
attention mask in the form the model reads without a host sync), word-level augmentation of
training batches and the DataLoaders a run trains and evaluates with."""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, PreTrainedTokenizerBase

from finetune.config import AugmentConfig, DataConfig, SamplerType
from finetune.tasks import get_task
from finetune.data import LABELS, TEACHER_LOGITS, TaskData, encode_texts
from finetune.sampling import describe_balance, sampling_weights

logger = logging.getLogger(__name__)


class LengthGroupedBatchSampler(Sampler[List[int]]):
    """Seeded, epoch-aware shuffled batches; with ``group_by_length`` batches hold similar lengths.

    Grouping works like the Trainer's ``group_by_length``: shuffle everything, cut the order into
    mega-batches of ``mega_batch_mult`` batches, sort each mega-batch by length, cut it into
    batches and shuffle the batch order. Randomness across buckets is kept; padding mostly goes.
    With ``weights`` (data.sampler=balanced) each epoch draws len(lengths) rows with replacement,
    row i with probability weights[i], instead of taking every row once; grouping is the same.
    The order depends only on (seed, epoch), which makes resuming exact and lets every process of
    a distributed run compute the same order (accelerate hands each its share of the batches).
    """

    def __init__(
        self,
        lengths: List[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        weights: Optional[np.ndarray] = None,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.weights is None else rng.choice(n, size=n, replace=True, p=self.weights)
        bs = self.batch_size
        if not self.group_by_length:
            yield from (order[i : i + bs].tolist() for i in range(0, len(order), bs))
            return
        mega = bs * self.mega_batch_mult
        batches = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + bs].tolist() for i in range(0, len(chunk), bs))
        # Full batches in random order; the one short batch (if any) goes last so that every
        # process of a distributed run sees full batches for as long as possible.
        short = [b for b in batches if len(b) < bs]
        full = [b for b in batches if len(b) == bs]
        for i in rng.permutation(len(full)):
            yield full[i]
        yield from short


# Encoders whose attention mask reaches attention only through transformers'
# masking_utils.create_bidirectional_mask (no sliding window, no pooling over the mask), which takes
# a ready 4D mask as it is: the same logits as from the 2D mask (tests/test_data.py checks each).
READY_MASK_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"})


class MaskForm(Enum):
    """What a collator passes as ``attention_mask``: ``plain`` the tokenizer's 2D mask; ``lean``
    none for a batch without padding and the 2D mask otherwise; ``ready`` none without padding
    and, with padding, the 4D boolean mask [batch, 1, 1, sequence] SDPA attention applies."""

    plain = "plain"
    lean = "lean"
    ready = "ready"


def mask_form(model) -> MaskForm:
    """The attention mask ``model`` reads without asking the device anything.

    Given a 2D mask under SDPA attention, transformers checks ``padding_mask.all()`` on every
    forward (to drop the mask when nothing is padded): on a GPU that read makes the host wait for
    the previous step's kernels. The collator knows on the host whether a batch is padded, so it
    sends no mask for an unpadded batch and a ready 4D mask (never read back) for a padded one.
    Other architectures (ModernBERT's sliding window, DeBERTa's own masks) keep the plain mask.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in READY_MASK_MODEL_TYPES:
        return MaskForm.plain
    # Eager attention adds the mask to the scores: it needs transformers' float mask, not a boolean one.
    return MaskForm.ready if getattr(config, "_attn_implementation", None) == "sdpa" else MaskForm.lean


class PaddingCollator:
    """Pads each batch to its own longest example (dynamic padding) and passes the attention mask
    in ``form`` (see ``mask_form``); whether a batch needs padding is read from its rows' lengths
    on the host, before padding."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: Optional[int] = None,
                 form: MaskForm = MaskForm.plain, label_pad_id: Optional[int] = None):  # fmt: skip
        if label_pad_id is None:
            self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
        else:  # a label per token (Task.label_pad_id), padded as the tokens are
            self.pad = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                                          label_pad_token_id=label_pad_id, return_tensors="pt")
        self.multiple, self.form = pad_to_multiple_of, form

    def __call__(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        batch = self.pad(features)
        if self.form == MaskForm.plain or "attention_mask" not in batch:
            return batch
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths) if not self.multiple else math.ceil(max(lengths) / self.multiple) * self.multiple
        # Rows that arrive padded already (a mask with zeros of their own) count as padded too.
        if min(lengths) == width and not any(0 in f.get("attention_mask", ()) for f in features):
            del batch["attention_mask"]  # nothing padded: attention needs no mask (SDPA may use flash kernels)
        elif self.form == MaskForm.ready:
            batch["attention_mask"] = batch["attention_mask"][:, None, None, :].bool()
        return batch


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: Optional[int] = None,
                  form: MaskForm = MaskForm.plain, label_pad_id: Optional[int] = None) -> PaddingCollator:  # fmt: skip
    """Pads each batch to its own longest example (dynamic padding); ``form``: see ``mask_form``;
    ``label_pad_id``: labels per token are padded with it (``Task.label_pad_id``)."""
    return PaddingCollator(tokenizer, pad_to_multiple_of, form, label_pad_id)


def augment_words(text: str, rng: np.random.Generator, cfg: AugmentConfig, mask_token: Optional[str]) -> str:
    """Random word deletion, swap and mask replacement, each with its probability per word."""
    words = text.split()
    if len(words) < 2:
        return text
    if cfg.swap:
        for i in range(len(words)):
            if rng.random() < cfg.swap:
                j = int(rng.integers(len(words)))
                words[i], words[j] = words[j], words[i]
    if cfg.mask and mask_token:
        words = [mask_token if rng.random() < cfg.mask else w for w in words]
    if cfg.delete:
        kept = [w for w in words if rng.random() >= cfg.delete]
        words = kept or [words[int(rng.integers(len(words)))]]  # never an empty text
    return " ".join(words)


class AugmentingCollator:
    """Augments raw training rows, then tokenizes and pads them. Each example's variant depends
    on (seed, epoch, index) only: new variants every epoch, identical ones after a resume."""

    def __init__(self, tokenizer, cfg: DataConfig, sampler: LengthGroupedBatchSampler, seed: int,
                 form: MaskForm = MaskForm.plain):  # fmt: skip
        self.tokenizer, self.cfg, self.sampler, self.seed = tokenizer, cfg, sampler, seed
        self.pad = make_collator(tokenizer, form=form)

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        texts, pairs = [], []
        for row in rows:
            rng = np.random.default_rng([self.seed, self.sampler.epoch, row["__index__"]])
            texts.append(augment_words(str(row[cfg.text_column]), rng, cfg.augment, self.tokenizer.mask_token))
            if cfg.text_pair_column:
                pairs.append(augment_words(str(row[cfg.text_pair_column]), rng, cfg.augment, self.tokenizer.mask_token))
        enc = encode_texts(self.tokenizer, texts, pairs if cfg.text_pair_column else None, cfg.max_length)
        targets = [k for k in (LABELS, TEACHER_LOGITS) if k in rows[0]]
        features = [{k: enc[k][i] for k in enc} | {k: row[k] for k in targets} for i, row in enumerate(rows)]
        return self.pad(features)


class _Indexed(torch.utils.data.Dataset):
    """Rows that carry their own index (for per-example augmentation seeds)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[int(i)], "__index__": int(i)}


ROW_INDEX = "row_index"  # each evaluation row's position in its split (to undo the length sort)


def eval_loader(ds: Dataset, batch_size: int, collator, **loader_kwargs) -> DataLoader:
    """Evaluation batches longest first, so that rows of similar length share a batch and little
    is padded (and an out-of-memory batch shows at once). Every row carries its index, which
    ``evaluate`` uses to put the outputs back in dataset order."""
    lengths = np.fromiter((len(ids) for ids in ds["input_ids"]), dtype=np.int64, count=len(ds))
    order = np.argsort(-lengths, kind="stable").tolist()
    ds = ds.add_column(ROW_INDEX, list(range(len(ds))))
    return DataLoader(ds, batch_size=batch_size, sampler=order, collate_fn=collator, **loader_kwargs)


def build_dataloaders(
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    group_by_length: bool = True,
    num_workers: int = 0,
    pad_to_multiple_of: Optional[int] = None,
    data_cfg: Optional[DataConfig] = None,
    pin_memory: bool = False,
    mask: MaskForm = MaskForm.plain,
) -> Dict[str, DataLoader]:
    """Train loader (shuffled, length-grouped) and evaluation loaders (sorted by length; the
    outputs of ``train.evaluate`` come back in dataset order); ``mask``: the attention mask's
    form, ``mask_form(model)`` for the model they feed."""
    collator = make_collator(tokenizer, pad_to_multiple_of, mask, get_task(data.task).label_pad_id)
    weights = None
    if data_cfg is not None and data_cfg.sampler == SamplerType.balanced:
        labels = np.asarray(data.train[LABELS])
        documents = data.train_document_index  # windows: balance documents, not windows
        weights = sampling_weights(labels, data.task, data.num_labels, data_cfg.sampler_power, documents)
        names = [data.id2label[i] for i in range(data.num_labels)]
        logger.info(describe_balance(labels, weights, names, data.task, data_cfg.sampler_power, documents))
    sampler = LengthGroupedBatchSampler(data.train_lengths, batch_size, seed, group_by_length=group_by_length,
                                        weights=weights)  # fmt: skip

    def generator() -> torch.Generator:
        # Each loader draws its worker seeds from its own generator, not the global RNG: then
        # creating an iterator (e.g. when resuming mid-epoch) leaves dropout randomness untouched.
        return torch.Generator().manual_seed(seed)

    if data.train_raw is not None and data_cfg is not None:  # data.augment is on
        train_ds, train_collate = _Indexed(data.train_raw), AugmentingCollator(tokenizer, data_cfg, sampler, seed, mask)
    else:
        train_ds, train_collate = data.train, collator
    loaders = {
        "train": DataLoader(train_ds, batch_sampler=sampler, collate_fn=train_collate, num_workers=num_workers,
                            pin_memory=pin_memory, generator=generator())
    }  # fmt: skip
    for split in ("validation", "test"):
        ds = getattr(data, split)
        if ds is not None:
            loaders[split] = eval_loader(ds, eval_batch_size, collator, num_workers=num_workers, pin_memory=pin_memory,
                                         generator=generator())  # fmt: skip
    return loaders

