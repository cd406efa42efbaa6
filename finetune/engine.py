"""What the loop needs to behave the same on one CPU and on GPUs under DDP, FSDP or DeepSpeed:

- per-step values (loss, gradient norm, non-finite flags, tokens) kept on the device and read back
  in one go per log window, so that the host never waits for the GPU inside the loop;
- gradient clipping whatever the engine returns (a tensor, a float under DeepSpeed, or None);
- optimizer steps that skip non-finite gradients on the device (the fp16 loss scaler, or a fused
  optimizer's ``found_inf``);
- best weights kept in a form the engine can restore (trained parameters in memory where every
  process holds the whole model; an accelerate state folder where parameters are sharded).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from finetune.model import load_trainable_state, trainable_state

# Engines whose parameters are sharded (and renamed) across processes.
SHARDED_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED)
# Below this the fp16 loss scale no longer makes fp16 gradients representable: every step overflows.
MIN_LOSS_SCALE = 1.0


def grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: Optional[float]) -> Optional[torch.Tensor]:
    """Clip (after the scaler unscaled the gradients) and return the total norm as a device tensor,
    or None where the engine does not report it (DeepSpeed before its first step)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    if norm is None or isinstance(norm, torch.Tensor):
        return norm
    return torch.tensor(float(norm), device=accelerator.device)


def optimizer_step(optimizer, bad: torch.Tensor, skip_bad: bool, scaler) -> None:
    """One optimizer step. A loss scaler skips overflowing steps by itself. Otherwise, under
    nan_policy=skip_step, a fused optimizer skips a step with non-finite gradients on the device
    (its ``found_inf``, as under the scaler); other optimizers need one host read of the flag."""
    if scaler is not None or not skip_bad:
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bad.item():
        optimizer.step()


@dataclass
class WindowStats:
    """One log window read back from the device; losses and token counts cover every process."""

    steps: List[int]
    lrs: List[float]
    losses: List[float]  # per step: mean over processes of each process's mean micro-batch loss
    norms: List[Optional[float]]
    bad_steps: List[int]  # steps whose loss (or, without a loss scaler, gradients) was non-finite
    overflow_steps: int  # steps the loss scaler skipped (gradient overflow, loss finite)
    tokens: int  # real (non-pad) tokens of every process
    loss_scale: Optional[float] = None


@dataclass
class StepWindow:
    """Per-step values kept as device tensors until :meth:`flush` reads them all with one sync."""

    device: torch.device
    steps: List[int] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    _losses: List[torch.Tensor] = field(default_factory=list)
    _norms: List[torch.Tensor] = field(default_factory=list)
    _bad: List[torch.Tensor] = field(default_factory=list)
    _overflow: List[torch.Tensor] = field(default_factory=list)
    _micro: List[torch.Tensor] = field(default_factory=list)
    _tokens: List[torch.Tensor] = field(default_factory=list)
    _has_norm: bool = True

    def add_batch(self, loss: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        self._micro.append(loss.detach().float())
        if "attention_mask" in batch:
            self._tokens.append(batch["attention_mask"].sum())

    def end_step(self, step: int, lr: float, norm: Optional[torch.Tensor], scaler_in_charge: bool) -> torch.Tensor:
        """Close one optimizer step; returns its non-finite flag (a device tensor, not read)."""
        loss = torch.stack(self._micro).mean()
        self._micro = []
        bad = ~torch.isfinite(loss)
        if norm is None:  # nothing to check: the engine (DeepSpeed) watches its own gradients
            self._has_norm = False
            norm = torch.full((), math.nan, device=loss.device)
            grad_bad = torch.zeros_like(bad)
        else:
            grad_bad = ~torch.isfinite(norm)
        # The scaler skips and counts overflows itself; they are no NaN. Without one, a
        # non-finite gradient is as bad as a non-finite loss.
        overflow = grad_bad & ~bad if scaler_in_charge else torch.zeros_like(bad)
        bad = bad if scaler_in_charge else bad | grad_bad
        self.steps.append(step)
        self.lrs.append(lr)
        self._losses.append(loss)
        self._norms.append(norm.float())
        self._bad.append(bad)
        self._overflow.append(overflow)
        return bad

    def flush(self, accelerator: Accelerator, scaler=None) -> Optional[WindowStats]:
        """Everything since the last flush, summed over processes, read with one host sync."""
        if not self.steps:
            return None
        n = len(self.steps)
        tokens = torch.stack(self._tokens).sum() if self._tokens else torch.zeros((), device=self.device)
        parts = [torch.stack(self._losses), torch.stack(self._norms), torch.stack(self._bad).float(),
                 torch.stack(self._overflow).float(), tokens.float().reshape(1)]  # fmt: skip
        scale = scaler._get_scale_async() if scaler is not None else None
        if scale is not None:
            parts.append(scale.float().reshape(1).to(self.device))
        values = torch.cat([p.to(self.device) for p in parts])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        values = values.tolist()  # the one device-to-host synchronisation of the window
        procs = accelerator.num_processes
        stats = WindowStats(
            steps=self.steps,
            lrs=self.lrs,
            losses=[v / procs for v in values[:n]],
            norms=[v / procs for v in values[n : 2 * n]] if self._has_norm else [None] * n,
            bad_steps=[s for s, v in zip(self.steps, values[2 * n : 3 * n]) if v > 0],
            overflow_steps=sum(v > 0 for v in values[3 * n : 4 * n]),
            tokens=int(values[4 * n]),
            loss_scale=values[4 * n + 1] / procs if scale is not None else None,
        )
        self.steps, self.lrs, self._losses, self._norms, self._bad, self._overflow, self._tokens = [], [], [], [], [], [], []
        return stats


def active_scaler(accelerator: Accelerator):
    """accelerate's fp16 GradScaler, when one is in charge of the gradients (not under DeepSpeed,
    which scales inside its engine)."""
    return getattr(accelerator, "scaler", None)


class BestWeights:
    """The best evaluation's weights. Where every process holds the whole model (one process, DDP):
    a CPU copy of the trained parameters, restored by name. Under FSDP / DeepSpeed parameters are
    sharded and renamed (``_fsdp_wrapped_module.``), so a copy by name may restore nothing: there
    the best weights are an accelerate state folder, written and restored shard by shard by the
    engine (``save_state`` / ``load_state``)."""

    def __init__(self, accelerator: Accelerator, folder: Path, names: Optional[set] = None):
        self.accelerator, self.folder, self.names = accelerator, Path(folder), names
        self.sharded = accelerator.distributed_type in SHARDED_ENGINES
        self.state: Optional[Dict[str, torch.Tensor]] = None

    @property
    def kept(self) -> bool:
        return self.state is not None or (self.sharded and self.folder.is_dir())

    def keep(self, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """Remember the current weights; returns the in-memory copy (None when sharded)."""
        if not self.sharded:
            self.state = trainable_state(self.accelerator.unwrap_model(model), self.names)
            return self.state
        acc = self.accelerator
        tmp = self.folder.parent / f".tmp-{self.folder.name}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            tmp.rename(self.folder)
        acc.wait_for_everyone()
        return None

    def restore(self, model: nn.Module) -> None:
        if not self.sharded:
            load_trainable_state(self.accelerator.unwrap_model(model), self.state)
        else:
            self.accelerator.load_state(str(self.folder))


def probe_memory_reserve(model: nn.Module) -> List[torch.Tensor]:
    """Tensors the size of AdamW's state (two per trained parameter), held while probing the batch
    size so that the batch found leaves room for the optimizer."""
    return [torch.empty_like(p) for p in model.parameters() if p.requires_grad for _ in range(2)]


def find_batch_size(model: nn.Module, dataset, collator, target: int, accelerator: Accelerator, loss_fn: Callable) -> int:
    """The largest per-process batch <= ``target`` whose forward and backward pass on the longest
    training examples fits in memory (accelerate halves it after each out-of-memory error), probed
    as training runs (dropout on, room left for AdamW's state). Every process probes its own device
    and all take the smallest result, so that they agree (different batches would hang DDP)."""
    from accelerate.utils import find_executable_batch_size, gather_object

    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    longest = np.argsort(-lengths, kind="stable")[:target].tolist()
    model = model.to(accelerator.device)
    was_training = model.training
    model.train()
    reserve = probe_memory_reserve(model)

    @find_executable_batch_size(starting_batch_size=target)
    def probe(batch_size: int) -> int:
        batch = collator([dataset[i] for i in longest[:batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        try_step(model, batch, labels, loss_fn)
        return batch_size

    found = probe()
    del reserve
    model.train(was_training)
    if accelerator.num_processes > 1:
        found = min(gather_object([found]))
    return found


def try_step(model: nn.Module, batch: Dict[str, torch.Tensor], labels: torch.Tensor, loss_fn: Callable) -> None:
    """One forward and backward pass, gradients discarded."""
    loss_fn(model(**batch).logits.float(), labels).backward()
    model.zero_grad(set_to_none=True)
