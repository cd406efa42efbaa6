"""Model: load a pre-trained encoder with a classification head, freeze or attach PEFT adapters, save."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from finetune.config import AdapterConfig, AdapterType, FinetuneError, ModelConfig

logger = logging.getLogger(__name__)

# Attention projection names across common encoders, for adapter.target_modules=auto:
# BERT / RoBERTa / ELECTRA (query, key, value), DistilBERT (q_lin, k_lin, v_lin),
# DeBERTa-v2/v3 (query_proj, key_proj, value_proj), ModernBERT (Wqkv), others (q_proj, ...).
ATTENTION_PROJECTIONS = (
    "query", "key", "value",
    "q_lin", "k_lin", "v_lin",
    "query_proj", "key_proj", "value_proj",
    "q_proj", "k_proj", "v_proj",
    "Wqkv", "qkv",
)  # fmt: skip
FINETUNE_META = "finetune.json"


class ModelError(FinetuneError):
    """A model that cannot be loaded or adapted as configured."""


@dataclass
class ModelInfo:
    """What was loaded and what will be trained, for the summary and the saved metadata."""

    architecture: str
    head_modules: List[str]
    adapter_targets: List[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:
        raise ModelError(_load_hint("tokenizer", cfg.name_or_path, err)) from err


def _load_hint(what: str, name: str, err: Exception) -> str:
    return (
        f"model.name_or_path='{name}': the {what} could not be loaded ({type(err).__name__}: {err}). "
        "Give a local folder holding config.json and weights, or a Hub model id; offline "
        "(HF_HUB_OFFLINE=1) a Hub id works only if it is already in the local cache."
    )


def head_module_names(model: nn.Module, fresh_keys: List[str]) -> List[str]:
    """Modules to train (and save with an adapter) besides the base: the task head, plus any
    base module whose weights were freshly initialised (e.g. a pooler missing from the checkpoint)."""
    prefix = model.base_model_prefix
    names = [name for name, child in model.named_children() if name != prefix and any(True for _ in child.parameters())]
    for key in fresh_keys:
        module = key.rsplit(".", 1)[0]
        if module.split(".")[0] == prefix and not any(module == n or module.startswith(n + ".") for n in names):
            names.append(module)
    return names


def build_model(
    cfg: ModelConfig,
    adapter: AdapterConfig,
    id2label: Dict[int, str],
    problem_type: str = "single_label_classification",
) -> tuple[nn.Module, ModelInfo]:
    """Load ``AutoModelForSequenceClassification`` for these labels, then freeze or add adapters.

    A checkpoint whose head has another number of labels gets a fresh head.
    """
    label2id = {name: i for i, name in id2label.items()}
    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            num_labels=len(id2label),
            id2label=dict(id2label),
            label2id=label2id,
            problem_type=problem_type,
        )
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            cfg.name_or_path,
            config=config,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except Exception as err:
        raise ModelError(_load_hint("model", cfg.name_or_path, err)) from err

    fresh = sorted(loading.get("missing_keys", [])) + sorted(
        k[0] if isinstance(k, (tuple, list)) else k for k in loading.get("mismatched_keys", [])
    )
    info = ModelInfo(architecture=type(model).__name__, head_modules=head_module_names(model, fresh))

    if adapter.type == AdapterType.none:
        if cfg.freeze == "base":
            freeze_all_but(model, info.head_modules)
    else:
        model = attach_adapter(model, adapter, info)

    info.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info.total_params = sum(p.numel() for p in model.parameters())
    return model, info


def freeze_all_but(model: nn.Module, trainable_modules: List[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = any(name == m or name.startswith(m + ".") for m in trainable_modules)


def linear_module_names(model: nn.Module) -> List[str]:
    """Distinct leaf names of the Linear layers inside the base model (valid LoRA targets)."""
    base = getattr(model, model.base_model_prefix, model)
    return sorted({name.rsplit(".", 1)[-1] for name, mod in base.named_modules() if isinstance(mod, nn.Linear)})


def resolve_target_modules(model: nn.Module, target_modules) -> List[str]:
    valid = linear_module_names(model)
    if target_modules == "auto":
        targets = [name for name in ATTENTION_PROJECTIONS if name in valid]
        if not targets:
            raise ModelError(
                f"adapter.target_modules=auto found no attention projections in {type(model).__name__}; "
                f"name them explicitly from its Linear layers: {valid}."
            )
        return targets
    unknown = [t for t in target_modules if t not in valid]
    if unknown:
        raise ModelError(
            f"adapter.target_modules={list(target_modules)}: {unknown} are not Linear layers of "
            f"{type(model).__name__}; valid: {valid}."
        )
    return list(target_modules)


def attach_adapter(model: nn.Module, adapter: AdapterConfig, info: ModelInfo) -> nn.Module:
    """Wrap the model with PEFT; the head (and any freshly initialised module) is trained and saved."""
    from peft import LoraConfig, TaskType, get_peft_model

    info.adapter_targets = resolve_target_modules(model, adapter.target_modules)
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=info.adapter_targets,
        modules_to_save=list(info.head_modules),
    )
    return get_peft_model(model, peft_config)


def log_summary(info: ModelInfo, log: logging.Logger = logger) -> None:
    pct = 100.0 * info.trainable_params / max(info.total_params, 1)
    log.info("Model: %s", info.architecture)
    log.info("Trainable parameters: %s / %s (%.2f%%)", f"{info.trainable_params:,}", f"{info.total_params:,}", pct)
    log.info("Head (always trained): %s", ", ".join(info.head_modules))
    if info.adapter_targets:
        log.info("Adapter targets: %s", ", ".join(info.adapter_targets))


def save_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    id2label: Dict[int, str],
    state_dict: Optional[dict] = None,
) -> None:
    """Write a folder that standard loaders read back.

    Full models load with ``AutoModelForSequenceClassification`` / ``pipeline``; adapters with
    ``peft.AutoPeftModelForSequenceClassification`` (the trained head is saved with them).
    ``finetune.json`` records the label maps either way.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "id2label": {str(i): name for i, name in id2label.items()},
        "label2id": {name: i for i, name in id2label.items()},
        "num_labels": len(id2label),
        "adapter": is_peft_model(model),
    }
    (out_dir / FINETUNE_META).write_text(json.dumps(meta, indent=2) + "\n")


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of the parameters that training changes (enough to restore the best model)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
