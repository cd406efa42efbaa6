"""PEFT adapters: LoRA, IA3 or any other PEFT method, with target modules found per architecture."""

from __future__ import annotations

from typing import List

from torch import nn

from finetune.config import AdapterConfig, AdapterType, FinetuneError

# Attention projection names across common encoders, for target_modules=auto:
# BERT / RoBERTa / ELECTRA (query, key, value), DistilBERT (q_lin, k_lin, v_lin),
# DeBERTa-v2/v3 (query_proj, key_proj, value_proj), ModernBERT (Wqkv, fused), others (q_proj, ...).
QUERY = ("query", "q_lin", "query_proj", "q_proj")
KEY = ("key", "k_lin", "key_proj", "k_proj")
VALUE = ("value", "v_lin", "value_proj", "v_proj")
FUSED_QKV = ("Wqkv", "qkv", "in_proj")


class AdapterError(FinetuneError):
    """An adapter that cannot be attached as configured."""


def linear_module_names(model: nn.Module) -> List[str]:
    """Distinct leaf names of the Linear layers inside the base model (valid adapter targets)."""
    base = getattr(model, model.base_model_prefix, model)
    return sorted({name.rsplit(".", 1)[-1] for name, mod in base.named_modules() if isinstance(mod, nn.Linear)})


def auto_targets(model: nn.Module, adapter_type: AdapterType) -> List[str]:
    """Attention projections of the loaded architecture: q/k/v for LoRA-like methods, k/v for IA3."""
    valid = linear_module_names(model)
    wanted = (KEY + VALUE) if adapter_type == AdapterType.ia3 else (QUERY + KEY + VALUE)
    ordered = [n for group in (QUERY, KEY, VALUE) for n in group if n in wanted]
    targets = [n for n in ordered if n in valid] or [n for n in FUSED_QKV if n in valid]
    if not targets:
        raise AdapterError(
            f"adapter.target_modules=auto found no attention projections in {type(model).__name__}; "
            f"name them explicitly from its Linear layers: {valid}."
        )
    return targets


def resolve_target_modules(model: nn.Module, adapter: AdapterConfig) -> List[str]:
    if adapter.target_modules == "auto":
        return auto_targets(model, adapter.type)
    valid = linear_module_names(model)
    unknown = [t for t in adapter.target_modules if t not in valid]
    if unknown:
        raise AdapterError(
            f"adapter.target_modules={list(adapter.target_modules)}: {unknown} are not Linear layers of "
            f"{type(model).__name__}; valid: {valid}."
        )
    return list(adapter.target_modules)


def build_peft_config(model: nn.Module, adapter: AdapterConfig, modules_to_save: List[str], new_token_ids=None,
                      task_type: str = "SEQ_CLS"):  # fmt: skip
    """The PEFT config for this adapter; the head (``modules_to_save``) is trained and saved with it.
    ``task_type``: PEFT's name of the head (the task's ``peft_task_type``)."""
    import peft
    from peft import TaskType

    targets = resolve_target_modules(model, adapter)
    common = {"task_type": TaskType[task_type], "target_modules": targets, "modules_to_save": list(modules_to_save)}
    if adapter.type == AdapterType.lora:
        extra = {"trainable_token_indices": list(new_token_ids)} if new_token_ids else {}
        return peft.LoraConfig(
            r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, use_dora=adapter.use_dora,
            **common, **extra,
        )  # fmt: skip
    if adapter.type == AdapterType.ia3:
        return peft.IA3Config(feedforward_modules=[], **common)

    name = str(adapter.peft_type).upper()
    mapping = peft.PEFT_TYPE_TO_CONFIG_MAPPING
    config_cls = mapping.get(name)
    if config_cls is None:
        raise AdapterError(f"adapter.peft_type='{adapter.peft_type}' is not a PEFT method; valid: {sorted(mapping)}.")
    fields = set(getattr(config_cls, "__dataclass_fields__", {}))
    kwargs = {k: v for k, v in common.items() if k in fields}
    unknown = sorted(set(adapter.options) - fields)
    if unknown:
        raise AdapterError(
            f"adapter.options {unknown} are not fields of peft.{config_cls.__name__}; valid: "
            f"{sorted(f for f in fields if not f.startswith('_'))}."
        )
    kwargs.update(adapter.options)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"adapter=peft ({name}): {err}") from err


def attach_adapter(model: nn.Module, adapter: AdapterConfig, modules_to_save: List[str], new_token_ids=None,
                   task_type: str = "SEQ_CLS"):  # fmt: skip
    """Wrap ``model`` with PEFT. Returns (peft_model, target module names)."""
    from peft import get_peft_model

    config = build_peft_config(model, adapter, modules_to_save, new_token_ids, task_type)
    targets = resolve_target_modules(model, adapter) if hasattr(config, "target_modules") else []
    try:
        return get_peft_model(model, config), targets
    except ValueError as err:  # PEFT's own "target modules not found" and the like
        raise AdapterError(f"adapter={adapter.type.value}: {err}. Valid Linear layers: {linear_module_names(model)}.") from err
