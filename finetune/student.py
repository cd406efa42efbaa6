"""Layer-subset students (``model.keep_layers``): a model built from some of a checkpoint's
encoder layers, in order, as DistilBERT was initialised from every other layer of BERT.

The student is a fresh model of the same class built from the checkpoint's config with the
smaller layer count, into which the kept layers' weights (and everything outside the layer stack:
embeddings, DeBERTa-v2's relative-position embeddings, final norms, head) are copied unchanged.
Rebuilding, rather than cutting the layer list in place, keeps every per-layer setting that a
layer reads from the config at construction (ModernBERT's attention type and window per layer)
consistent with what ``from_pretrained`` builds when the saved student is loaded again.
"""

from __future__ import annotations

import copy
import logging
from typing import List, Sequence

from torch import nn

from finetune.config import FinetuneError

logger = logging.getLogger(__name__)

# Architectures whose encoder is one stack of identical blocks that a subset can replace; any
# per-layer config list (ModernBERT's layer_types) is cut to the same subset.
SUPPORTED_TYPES = ("bert", "roberta", "distilbert", "deberta-v2", "modernbert")
_PER_LAYER_CONFIG_LISTS = ("layer_types",)


class StudentError(FinetuneError):
    """model.keep_layers that the checkpoint cannot satisfy."""


def check_keep_layers(config, keep: Sequence[int], name: str = "the checkpoint") -> None:
    """Before anything is loaded or written: the architecture is supported and every index is one
    of the checkpoint's layers. Raises StudentError naming the fix."""
    if config.model_type not in SUPPORTED_TYPES:
        raise StudentError(
            f"model.keep_layers is not supported for {name} (model_type '{config.model_type}'); it works for "
            f"{', '.join(SUPPORTED_TYPES)}. Drop model.keep_layers, or start from a checkpoint of those."
        )
    depth = config.num_hidden_layers
    bad = [i for i in keep if i >= depth]
    if bad:
        raise StudentError(
            f"model.keep_layers={list(keep)}: {name} has {depth} encoder layers (0..{depth - 1}), so {bad} do not "
            "exist; choose indices among them."
        )
    if config.model_type == "modernbert" and keep[0] != 0:
        raise StudentError(
            f"model.keep_layers={list(keep)}: ModernBERT's first layer reads the normalised embeddings without "
            "an attention norm of its own (the other layers have one), so a student must keep layer 0 first."
        )


def keep_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A model of the same class holding only encoder layers ``keep`` (renumbered 0..n-1), every
    other weight copied exactly. Its config says ``num_hidden_layers = len(keep)``."""
    from transformers import AutoModelForSequenceClassification

    from finetune.model import encoder_layers

    config = model.config
    check_keep_layers(config, keep, type(model).__name__)
    layers_name, layers = encoder_layers(model)
    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(keep)  # DistilBERT maps it to n_layers
    for key in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(student_config, key, [values[i] for i in keep])
    student = AutoModelForSequenceClassification.from_config(student_config, dtype=next(model.parameters()).dtype)
    student.load_state_dict(_renumbered(model.state_dict(), layers_name, keep), strict=True)
    logger.info("model.keep_layers: encoder layers %s of %d kept as layers 0..%d.", list(keep), len(layers), len(keep) - 1)
    return student


def _renumbered(state: dict, layers_name: str, keep: List[int]) -> dict:
    """The state dict with layer ``keep[j]`` renamed to layer ``j`` and the other layers dropped."""
    prefix = layers_name + "."
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) in new_index:
            out[f"{prefix}{new_index[int(index)]}.{rest}"] = value
    return out
