"""Publishing to the Hugging Face Hub: the folder to push (model, tokenizer, label maps, config,
metrics, model card) and the push itself. The entry point calls this after training returns."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import List, Optional

from finetune.config import REPO_ID_RE, FinetuneConfig, FinetuneError, HubConfig, learning_rate
from finetune.sampling import imbalance_text
from finetune.tasks import default_task, get_task

logger = logging.getLogger(__name__)


class HubError(FinetuneError):
    """The Hub push cannot happen as configured."""


def check_can_push(cfg: HubConfig) -> None:
    """Before any training: a push needs a token (the repo id is checked with the config)."""
    if not cfg.push or cfg.dry_run:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise HubError(
            "hub.push=true but no Hugging Face token was found. Log in with `hf auth login` or set HF_TOKEN "
            "(a token with write access), or use hub.dry_run=true to write the folder without pushing."
        )


def _hub_id(value: Optional[str]) -> Optional[str]:
    """``value`` if it names a Hub repo rather than a local folder."""
    if not value or Path(value).exists() or not REPO_ID_RE.match(value):
        return None
    return value


def card_metadata(conf: FinetuneConfig, summary: dict, meta: dict, adapter_only: bool):
    from huggingface_hub import EvalResult, ModelCardData

    h = conf.hub
    base_model = h.base_model or _hub_id(conf.model.name_or_path)
    datasets: List[str] = list(h.datasets) or ([conf.data.dataset] if _hub_id(conf.data.dataset) else [])
    dataset_id = datasets[0] if datasets else "custom"
    task = _task(meta)
    results = []
    for split, metrics in (("validation", summary.get("best") or {}), ("test", summary.get("test") or {})):
        for name, value in metrics.items():
            if name in ("step", "epoch") or not isinstance(value, (int, float)):
                continue
            results.append(
                EvalResult(
                    task_type=task.card_task_type,
                    task_name=task.card_task_name,
                    dataset_type=dataset_id,
                    dataset_name=dataset_id,
                    dataset_config=conf.data.config,
                    dataset_split=split,
                    metric_type=name,
                    metric_name=f"{split} {name}",
                    metric_value=round(float(value), 6),
                )
            )
    tags = ["finetune", task.card_tag]
    tags += ([conf.adapter.type.value] if conf.adapter.type.value != "none" else []) + list(h.tags)
    return ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag=task.pipeline_tag,
        tags=tags,
        license=h.license,
        model_name=(h.repo_id or "model").split("/")[-1],
        eval_results=results or None,
    )


def _task(meta: dict):
    """The task of the run whose finetune.json is ``meta``."""
    return get_task(meta["task"]) if meta.get("task") else default_task()


def model_card(conf: FinetuneConfig, summary: dict, meta: dict, adapter_only: bool):
    from huggingface_hub import ModelCard

    data, task = card_metadata(conf, summary, meta, adapter_only), _task(meta)
    name = conf.hub.repo_id or "this-model"
    labels = [meta["id2label"][str(i)] for i in range(len(meta.get("id2label", {})))]
    t = conf.train
    dataset = conf.data.dataset or "local files (" + ", ".join(
        Path(p).name for p in (conf.data.train_file, conf.data.validation_file, conf.data.test_file) if p
    ) + ")"
    rows = [("validation (best)", summary.get("best") or {}), ("test", summary.get("test") or {})]
    metric_names = [k for k in (summary.get("best") or {}) if k not in ("step", "epoch")]
    table = "| split | " + " | ".join(metric_names) + " |\n|---|" + "---|" * len(metric_names) + "\n"
    for split, m in rows:
        if m:
            table += f"| {split} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in metric_names) + " |\n"
    if adapter_only:
        usage = (
            f"```python\nfrom peft import {task.peft_head}\nfrom transformers import AutoTokenizer\n\n"
            f"model = {task.peft_head}.from_pretrained(\n    \"{name}\", num_labels={len(labels)},\n"
            f"    id2label={dict(enumerate(labels))},\n    label2id={ {n: i for i, n in enumerate(labels)} },\n)\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n```\n"
        )
    else:
        usage = (
            "```python\nfrom transformers import pipeline\n\n"
            f"classifier = pipeline(\"{task.pipeline_tag}\", model=\"{name}\")\nclassifier(\"...\")\n```\n"
        )
    content = f"""---
{data.to_yaml()}
---

# {name.split("/")[-1]}

A {task.name.replace("_", " ")} model fine-tuned from
`{data.base_model or conf.model.name_or_path}` on {dataset} with finetune (`python -m finetune`).

Labels: {", ".join(f"`{n}`" for n in labels)}

## Results

{table}
## Training

| setting | value |
|---|---|
| strategy | {"adapter " + conf.adapter.type.value if conf.adapter.type.value != "none" else "freeze " + conf.model.freeze} |
| epochs / optimizer steps | {t.epochs} / {summary.get("steps")} |
| batch size (per process) | {t.batch_size} |
| learning rate | {learning_rate(conf)} ({conf.scheduler.name.value}, warmup {conf.scheduler.warmup_ratio}) |
| optimizer | {conf.optimizer.name.value}, weight decay {conf.optimizer.weight_decay} |
| max length | {conf.data.max_length} |
| class imbalance | {imbalance_text(conf)} |{_student_rows(conf)}
| mixed precision | {t.mixed_precision.value} |
| seed | {t.seed} |

The full resolved configuration is in `finetune_config.yaml`, every evaluation in `metrics.json`.

## Usage

{usage}"""
    return ModelCard(content)


def _student_rows(conf: FinetuneConfig) -> str:
    """Model-card rows for a layer-subset student and / or a distilled run (empty otherwise)."""
    rows = ""
    if conf.model.keep_layers is not None:
        rows += f"\n| encoder layers kept | {list(conf.model.keep_layers)} of the base model |"
    d = conf.distill
    if d.teacher:
        rows += f"\n| distilled from | `{d.teacher}` (alpha {d.alpha}, temperature {d.temperature}) |"
    return rows


def build_push_folder(out_dir: Path, conf: FinetuneConfig, summary: dict, dest: Path) -> Path:
    """Assemble exactly what is pushed: the model at the root (loadable by from_pretrained /
    pipeline, or peft for an unmerged adapter), adapter/ when merged, config, metrics, card."""
    out_dir, dest = Path(out_dir), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out_dir / "model", dest)
    if (out_dir / "adapter").is_dir():
        shutil.copytree(out_dir / "adapter", dest / "adapter")
    shutil.copy(out_dir / "config.yaml", dest / "finetune_config.yaml")
    shutil.copy(out_dir / "metrics.json", dest / "metrics.json")
    meta = json.loads((dest / "finetune.json").read_text())
    adapter_only = bool(meta.get("adapter"))
    model_card(conf, summary, meta, adapter_only).save(dest / "README.md")
    return dest


def publish(out_dir: Path, conf: FinetuneConfig, summary: dict) -> Optional[str]:
    """Push (or, with hub.dry_run, only assemble) the run's model. Returns the repo URL or folder."""
    h = conf.hub
    if not (h.push or h.dry_run):
        return None
    folder = build_push_folder(out_dir, conf, summary, Path(out_dir) / "hub")
    if h.dry_run:
        logger.info("hub.dry_run: the folder that would be pushed is %s", folder.resolve())
        return str(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(h.repo_id, private=h.private, exist_ok=True)
        if h.revision:
            api.create_branch(h.repo_id, branch=h.revision, exist_ok=True)
        api.upload_folder(
            repo_id=h.repo_id,
            folder_path=str(folder),
            revision=h.revision,
            commit_message=h.commit_message or f"finetune: {conf.model.name_or_path} fine-tuned ({summary.get('steps')} steps)",
        )
    except Exception as err:  # network, permissions, quota: training is done and must not be lost
        raise HubError(
            f"pushing to {h.repo_id} failed ({type(err).__name__}: {err}). The trained model is saved; the folder "
            f"to push is {folder}. Push it later with `hf upload {h.repo_id} {folder}`."
        ) from err
    logger.info("Pushed to %s%s", repo, f" (branch {h.revision})" if h.revision else "")
    return str(repo)
