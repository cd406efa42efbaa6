"""Model: load a pre-trained encoder with a classification head, adapt head and inputs, freeze
or attach PEFT adapters, save in a form the standard loaders read back."""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from finetune.adapters import attach_adapter
from finetune.tasks import default_task, get_task, model_task
from finetune.config import AdapterConfig, AdapterType, FinetuneError, ModelConfig

logger = logging.getLogger(__name__)

FINETUNE_META = "finetune.json"
# Where each architecture keeps the dropout in front of its classifier.
_HEAD_DROPOUT_KEY = {"distilbert": "seq_classif_dropout", "deberta": "cls_dropout", "deberta-v2": "cls_dropout"}
# Architectures whose position ids start after the padding index (fairseq heritage).
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "xmod", "data2vec-text"}


class ModelError(FinetuneError):
    """A model that cannot be loaded or adapted as configured."""


@dataclass
class ModelInfo:
    """What was loaded and what will be trained, for the summary and the saved metadata."""

    architecture: str
    head_modules: List[str]
    num_layers: int = 0
    frozen_modules: List[str] = field(default_factory=list)
    adapter_targets: List[str] = field(default_factory=list)
    new_token_ids: List[int] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
# Set by finetune from the data (labels) and the task: an override would break the label mapping.
_OWN_CONFIG_KEYS = {"num_labels", "id2label", "label2id", "problem_type", "architectures"}


def override_config(config, overrides: Dict[str, object], log: bool = True) -> None:
    """model.config_overrides: set fields the checkpoint's config already has (a misspelt one would
    otherwise be stored and ignored)."""
    for key, value in (overrides or {}).items():
        if key in _OWN_CONFIG_KEYS or callable(getattr(config, key, None)):
            raise ModelError(
                f"model.config_overrides.{key}: '{key}' is not a field finetune lets you override (labels and the "
                "task come from the data: data.label_names / task=...). Remove it from model.config_overrides."
            )
        if not hasattr(config, key):
            import difflib

            known = sorted(k for k in config.to_dict() if not k.startswith("_"))
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5) or [k for k in known if "dropout" in k]
            raise ModelError(
                f"model.config_overrides.{key}: {type(config).__name__} has no field '{key}', so it would be "
                f"ignored. Use one of its fields (config.json of the checkpoint), e.g. {', '.join(close) or ', '.join(known[:8])}."
            )
        setattr(config, key, value)
    if overrides and log:
        logger.info("Model config overrides: %s", ", ".join(f"{k}={v}" for k, v in overrides.items()))


def _load_hint(what: str, name: str, err: Exception) -> str:
    return (
        f"model.name_or_path='{name}': the {what} could not be loaded ({type(err).__name__}: {' '.join(str(err).split())}). "
        "Give a local folder holding config.json and weights, or a Hub model id; offline "
        "(HF_HUB_OFFLINE=1) a Hub id works only if it is already in the local cache."
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with ``model.add_tokens`` added."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:
        raise ModelError(_load_hint("tokenizer", cfg.name_or_path, err)) from err
    if cfg.add_tokens:
        added = tokenizer.add_tokens(list(cfg.add_tokens))
        logger.info("Added %d new token(s) to the tokenizer: %s", added, list(cfg.add_tokens))
    return tokenizer


def _load_config(cfg: ModelConfig):
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise ModelError(_load_hint("model config", cfg.name_or_path, err)) from err


def max_input_length(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, config=None) -> int:
    """The longest input (in tokens) the model accepts."""
    return input_limit(config or _load_config(cfg), tokenizer)


def input_limit(config, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input (in tokens) a model of ``config`` with ``tokenizer`` accepts: its positions,
    and the tokenizer's model_max_length where it names one (a tokenizer saved without it says 1e30)."""
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    if config.model_type in _POSITION_OFFSET_TYPES:
        limit -= (config.pad_token_id or 0) + 1
    if 0 < tokenizer.model_max_length < 10**6:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def check_model(cfg: ModelConfig, adapter: AdapterConfig, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Before anything is written: the checkpoint has weights, its tokenizer fits its embedding,
    ``data.max_length`` fits its positions, and the adapter's target modules exist in it.

    Raises ModelError / AdapterError naming the key and the fix.
    """
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    config = _load_config(cfg)
    override_config(copy.deepcopy(config), cfg.config_overrides, log=False)  # a misspelt field fails here, early
    if cfg.keep_layers is not None:
        from finetune.student import check_keep_layers

        check_keep_layers(config, cfg.keep_layers, cfg.name_or_path)
    folder = Path(cfg.name_or_path)
    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if folder.is_dir() and not any((folder / name).is_file() for name in weights):
        raise ModelError(
            f"model.name_or_path='{cfg.name_or_path}' holds no model weights (none of {', '.join(weights)}). "
            "Point it at the folder save_pretrained wrote, weights included, or at a Hub model id."
        )
    vocab_size = getattr(config, "vocab_size", None)
    added = set(cfg.add_tokens)  # model.add_tokens get new embedding rows
    largest = max((i for token, i in tokenizer.get_vocab().items() if token not in added), default=-1)
    if vocab_size and largest >= vocab_size:
        raise ModelError(
            f"model.name_or_path='{cfg.name_or_path}': the tokenizer has token ids up to {largest} but the model's "
            f"embedding has {vocab_size} rows (vocab_size in config.json), so the tokenizer does not belong to "
            "this model. Save the tokenizer the model was trained with into the same folder."
        )
    limit = max_input_length(cfg, tokenizer, config)
    if max_length > limit:
        raise ModelError(
            f"data.max_length={max_length} exceeds what {cfg.name_or_path} accepts ({limit} tokens); "
            f"set data.max_length to at most {limit}."
        )
    if adapter.type != AdapterType.none:
        from finetune.adapters import resolve_target_modules

        with torch.device("meta"):  # the module tree only: no memory, no weights read
            skeleton = AutoModelForSequenceClassification.from_config(config, trust_remote_code=cfg.trust_remote_code)
        resolve_target_modules(skeleton, adapter)


def build_model(
    cfg: ModelConfig,
    adapter: AdapterConfig,
    id2label: Dict[int, str],
    problem_type: str = "single_label_classification",
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
) -> tuple[nn.Module, ModelInfo]:
    """Load the task's head class (``Task.head``: ``AutoModelForSequenceClassification`` for the
    sequence tasks) for these labels, adapt, then freeze or add adapters.

    A checkpoint whose head has another number of labels gets a fresh head. Raises ModelError
    (or AdapterError) before any training when the configuration does not fit the architecture.
    """
    task = get_task(problem_type)
    label2id = {name: i for i, name in id2label.items()}
    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            num_labels=len(id2label),
            id2label=dict(id2label),
            label2id=label2id,
            problem_type=task.name,
        )
        if cfg.head_dropout is not None:
            # Set directly: from_pretrained drops keys the config class does not define by default.
            setattr(config, _HEAD_DROPOUT_KEY.get(config.model_type, "classifier_dropout"), cfg.head_dropout)
        override_config(config, cfg.config_overrides)
        model, loading = task.model_class().from_pretrained(
            cfg.name_or_path,
            config=config,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(_load_hint("model", cfg.name_or_path, err)) from err
    if cfg.keep_layers is not None:  # a layer-subset student, before any head / adapter change
        from finetune.student import keep_layers

        model = keep_layers(model, cfg.keep_layers)

    fresh = sorted(loading.get("missing_keys", [])) + sorted(
        k[0] if isinstance(k, (tuple, list)) else k for k in loading.get("mismatched_keys", [])
    )
    info = ModelInfo(architecture=type(model).__name__, head_modules=head_module_names(model, fresh))
    info.num_layers = len(encoder_layers(model)[1])
    if cfg.reinit_head:
        reinit_modules(model, info.head_modules)

    old_vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > old_vocab:
        model.resize_token_embeddings(len(tokenizer))
        info.new_token_ids = list(range(old_vocab, len(tokenizer)))

    if adapter.type == AdapterType.none:
        apply_freeze(model, cfg.freeze, info)
        if info.new_token_ids:
            train_new_token_rows(model, info.new_token_ids)
    else:
        model, info.adapter_targets = attach_adapter(model, adapter, info.head_modules, info.new_token_ids,
                                                      task.peft_task_type)  # fmt: skip

    if adapter.type == AdapterType.none:  # with an adapter, all but adapter and head is frozen
        info.frozen_modules = frozen_module_summary(model)
    info.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info.total_params = sum(p.numel() for p in model.parameters())
    return model, info


def head_module_names(model: nn.Module, fresh_keys: List[str]) -> List[str]:
    """Modules to train (and save with an adapter) besides the base: the task head, plus any
    base module whose weights were freshly initialised (e.g. a pooler missing from the checkpoint)."""
    prefix = model.base_model_prefix
    names = [n for n, child in model.named_children() if n != prefix and any(True for _ in child.parameters())]
    for key in fresh_keys:
        module = key.rsplit(".", 1)[0]
        if module.split(".")[0] == prefix and not any(module == n or module.startswith(n + ".") for n in names):
            names.append(module)
    return names


def reinit_modules(model: nn.Module, names: List[str]) -> None:
    """Fresh weights for these modules, drawn as BERT-style models initialise new ones
    (normal(0, initializer_range) weights, zero biases, unit norms)."""
    std = getattr(model.config, "initializer_range", 0.02)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            for sub in modules[name].modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, mean=0.0, std=std)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------
def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the ModuleList in the base model of num_hidden_layers blocks."""
    base_prefix = model.base_model_prefix
    base = getattr(model, base_prefix)
    depth = getattr(model.config, "num_hidden_layers", None)
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return f"{base_prefix}.{name}", module
    raise ModelError(f"{type(model).__name__}: no stack of {depth} encoder layers found; use model.freeze=regex:...")


def embeddings_prefix(model: nn.Module) -> str:
    base_prefix = model.base_model_prefix
    base = getattr(model, base_prefix)
    if hasattr(base, "embeddings"):
        return f"{base_prefix}.embeddings"
    word = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is word)


def frozen_prefixes(model: nn.Module, spec: str, head_modules: List[str]) -> List[str]:
    """Parameter-name prefixes (or one regex, as 're:...') that ``spec`` freezes."""
    if spec == "none":
        return []
    if spec == "base":
        return [model.base_model_prefix + "."]
    layers_name, layers = encoder_layers(model) if spec.startswith("layers:") else ("", [])
    if spec == "embeddings":
        return [embeddings_prefix(model) + "."]
    if spec.startswith("layers:"):
        n = int(spec.split(":", 1)[1])
        if n > len(layers):
            raise ModelError(
                f"model.freeze='{spec}': {type(model).__name__} has {len(layers)} encoder layers; "
                f"valid: layers:0 .. layers:{len(layers)} (or base to freeze the whole encoder)."
            )
        return [embeddings_prefix(model) + "."] + [f"{layers_name}.{i}." for i in range(n)]
    if spec.startswith("regex:"):
        return ["re:" + spec[len("regex:"):]]
    raise ModelError(f"model.freeze='{spec}' is not a freeze strategy.")  # config validation prevents this


def apply_freeze(model: nn.Module, spec: str, info: ModelInfo) -> None:
    """Set requires_grad per ``model.freeze``; the head always stays trainable."""
    prefixes = frozen_prefixes(model, spec, info.head_modules)
    names = [n for n, _ in model.named_parameters()]
    if prefixes and prefixes[0].startswith("re:"):
        pattern = re.compile(prefixes[0][3:])
        hit = {n for n in names if pattern.search(n)}
        if not hit:
            examples = ", ".join(names[:3] + names[-3:])
            raise ModelError(
                f"model.freeze='{spec}' matches no parameter of {type(model).__name__}; names look like: {examples}."
            )
    else:
        hit = {n for n in names if any(n.startswith(p) for p in prefixes)}
    for name, param in model.named_parameters():
        in_head = any(name.startswith(h + ".") for h in info.head_modules)
        param.requires_grad = in_head or name not in hit
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model.freeze='{spec}' leaves nothing to train.")


def train_new_token_rows(model: nn.Module, new_ids: List[int]) -> None:
    """Under freezing, the added tokens' embedding rows still train; the old rows get zero gradient
    (and the optimizer gives this matrix no weight decay), so they stay bit-identical."""
    weight = model.get_input_embeddings().weight
    if weight.requires_grad:
        return
    weight.requires_grad = True
    mask = torch.zeros(weight.shape[0], 1)
    mask[new_ids] = 1.0
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    weight._finetune_partial = True  # read by optim.param_groups: never weight-decayed


def unfreeze_next_layer(model: nn.Module) -> Optional[str]:
    """Gradual unfreezing: make the top-most frozen encoder layer trainable (then the embeddings).
    Returns the unfrozen module's name, or None when nothing is left frozen."""
    layers_name, layers = encoder_layers(model)
    candidates = [(f"{layers_name}.{i}", layers[i]) for i in reversed(range(len(layers)))]
    emb = embeddings_prefix(model)
    candidates.append((emb, model.get_submodule(emb)))
    for name, module in candidates:
        params = list(module.parameters())
        if params and not all(p.requires_grad for p in params):
            for p in params:
                p.requires_grad = True
            return name
    return None


def layer_depths(model: nn.Module) -> Dict[str, int]:
    """Depth of every parameter for layer-wise LR decay: embeddings 0, encoder layer i -> i + 1,
    everything else (pooler, final norm, head) L + 1."""
    layers_name, layers = encoder_layers(model)
    emb = embeddings_prefix(model) + "."
    depths = {}
    for name, _ in model.named_parameters():
        depth = len(layers) + 1
        if name.startswith(emb):
            depth = 0
        elif name.startswith(layers_name + "."):
            depth = int(name[len(layers_name) + 1 :].split(".", 1)[0]) + 1
        depths[name] = depth
    return depths


def frozen_module_summary(model: nn.Module) -> List[str]:
    """The largest modules whose parameters are all frozen."""
    frozen = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if not name or not params or any(p.requires_grad for p in params):
            continue
        if not any(name.startswith(f + ".") for f in frozen):
            frozen.append(name)
    return frozen


def log_summary(info: ModelInfo, log: logging.Logger = logger) -> None:
    pct = 100.0 * info.trainable_params / max(info.total_params, 1)
    log.info("Model: %s (%d encoder layers)", info.architecture, info.num_layers)
    log.info("Trainable parameters: %s / %s (%.2f%%)", f"{info.trainable_params:,}", f"{info.total_params:,}", pct)
    log.info("Head (always trained): %s", ", ".join(info.head_modules))
    if info.frozen_modules:
        shown = info.frozen_modules if len(info.frozen_modules) <= 8 else info.frozen_modules[:8] + ["..."]
        log.info("Frozen: %s", ", ".join(shown))
    if info.adapter_targets:
        log.info("Adapter targets: %s", ", ".join(sorted(info.adapter_targets)))
    if info.new_token_ids:
        log.info("New token rows (trained): %s", info.new_token_ids)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _write_meta(out_dir: Path, id2label: Dict[int, str], adapter: bool, extra: Optional[dict] = None) -> None:
    meta = {
        "id2label": {str(i): name for i, name in id2label.items()},
        "label2id": {name: i for i, name in id2label.items()},
        "num_labels": len(id2label),
        "adapter": adapter,
        **(extra or {}),
    }
    (out_dir / FINETUNE_META).write_text(json.dumps(meta, indent=2) + "\n")


def save_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    id2label: Dict[int, str],
    state_dict: Optional[dict] = None,
    meta: Optional[dict] = None,
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
    _write_meta(out_dir, id2label, adapter=is_peft_model(model), extra=meta)


def save_merged(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, id2label: Dict[int, str], meta: Optional[dict] = None
) -> None:
    """Merge the adapter into the base weights (the trained head included) and save a plain
    transformers model: ``pipeline`` loads it without peft. Leaves ``model`` unmerged."""
    merged = merge_adapter(model)
    merged.config.id2label = dict(id2label)
    merged.config.label2id = {n: i for i, n in id2label.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_meta(out_dir, id2label, adapter=False, extra=meta)


def merge_adapter(peft_model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapter merged into a copy of the base weights (the
    trained head included); ``peft_model`` stays unmerged."""
    merged = copy.deepcopy(peft_model)
    _unwrap_modules_to_save(merged)
    return merged.merge_and_unload()


def _unwrap_modules_to_save(peft_model: nn.Module) -> None:
    """Put each trained ``modules_to_save`` copy in place of its wrapper. PEFT's IA3 merge fails on
    wrappers around composite heads (RoBERTa's, DeBERTa's, ModernBERT's); LoRA's does this itself."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = peft_model.get_submodule(parent_name) if parent_name else peft_model
        setattr(parent, child, wrapper.modules_to_save[wrapper.active_adapters[0]])


def load_saved_model(path, **kwargs) -> nn.Module:
    """Load a ``model/`` folder written by finetune: a full model or a PEFT adapter.

    Adapters are loaded with ``peft.AutoPeftModelForSequenceClassification``, passing the label
    maps from ``finetune.json``: PEFT otherwise rebuilds the base with its default 2-label head,
    and a head trained for any other number of labels would not fit.
    """
    path = Path(path)
    meta_file = path / FINETUNE_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"adapter": (path / "adapter_config.json").is_file()}
    if "id2label" in meta:
        id2label = {int(i): n for i, n in meta["id2label"].items()}
        kwargs = {"num_labels": len(id2label), "id2label": id2label, "label2id": meta["label2id"], **kwargs}
        if meta.get("task"):
            kwargs.setdefault("problem_type", meta["task"])
    if meta.get("adapter"):
        task = get_task(meta["task"]) if meta.get("task") else default_task()
        return task.peft_model_class().from_pretrained(str(path), **kwargs)
    # A folder without finetune.json (a Hub model, a plain save_pretrained) by its config: its
    # problem_type, else its head class (a Hub NER model's ...ForTokenClassification).
    config = AutoConfig.from_pretrained(str(path))
    task = model_task(meta.get("task"), config.problem_type, config.num_labels, config.architectures or ())
    return task.model_class().from_pretrained(path, **kwargs)


def trainable_state(model: nn.Module, names: Optional[set] = None) -> Dict[str, torch.Tensor]:
    """A CPU copy of the parameters that training changes (enough to restore the best model):
    those in ``names`` (e.g. everything the optimizer holds), else those with requires_grad."""
    return {
        n: p.detach().to("cpu", copy=True)
        for n, p in model.named_parameters()
        if (n in names if names is not None else p.requires_grad)
    }


def load_trainable_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
