"""What the loop needs to behave the same on one CPU and on GPUs under DDP, FSDP or DeepSpeed:

- per-step values (loss, gradient norm, non-finite flags, tokens) kept on the device and read back
  in one go per log window, so that the host never waits for the GPU inside the loop; the same
  reduce carries each process's stop request, so that all processes stop at the same step;
- decisions every process must take together (stop, non-finite weights) made on values reduced
  over processes, never on one process's own view (a lone checkpointing process hangs the others);
- gradient clipping whatever the engine returns (a tensor, a float under DeepSpeed, or None);
- optimizer steps that skip non-finite gradients on the device (the fp16 loss scaler, or a fused
  optimizer's ``found_inf``);
- best weights kept in a form the engine can restore (trained parameters in memory where every
  process holds the whole model; an accelerate state folder where parameters are sharded).
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from finetune.checkpoint import ResumeError, link_tree, save_state_atomically
from finetune.data import TEACHER_LOGITS
from finetune.model import load_trainable_state, trainable_state

logger = logging.getLogger(__name__)

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


@contextmanager
def full_precision(accelerator: Accelerator, model: nn.Module):
    """Run ``model`` without the autocast accelerate wrapped its forward in (mixed precision), as the
    saved model runs in ``from_pretrained`` / ``pipeline`` / ``finetune.predict``. accelerate keeps
    the plain forward as ``_original_forward``; it is put back for the duration. (An outer
    ``torch.autocast(enabled=False)`` would not do: the wrapper enters its own autocast inside it.)"""
    inner = accelerator.unwrap_model(model)
    wrapped, plain = inner.__dict__.get("forward"), inner.__dict__.get("_original_forward")
    if wrapped is None or plain is None:  # no mixed precision, or an engine that casts itself (DeepSpeed)
        yield model
        return
    inner.forward = plain
    try:
        yield model
    finally:
        inner.forward = wrapped


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
    stop: bool = False  # some process asked to stop (SIGTERM / SIGINT): all stop at this step


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
    _has_norm: List[bool] = field(default_factory=list)  # per step: did the engine report a norm

    def add_batch(self, loss: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        self._micro.append(loss.detach().float())
        mask = batch.get("attention_mask")
        if mask is not None:  # 2D or ready 4D [batch, 1, 1, sequence]: the same sum
            self._tokens.append(mask.sum())
        elif "input_ids" in batch:  # a batch without padding comes without a mask: every position is a token
            self._tokens.append(torch.full((), batch["input_ids"].numel(), device=loss.device))

    def end_step(self, step: int, lr: float, norm: Optional[torch.Tensor], scaler_in_charge: bool) -> torch.Tensor:
        """Close one optimizer step; returns its non-finite flag (a device tensor, not read)."""
        loss = torch.stack(self._micro).mean()
        self._micro = []
        bad = ~torch.isfinite(loss)
        # No norm (DeepSpeed before its first step): only the loss is checked; non-finite gradients
        # under a finite loss are the engine's to handle (DeepSpeed skips overflowing steps itself).
        self._has_norm.append(norm is not None)
        if norm is None:
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

    def flush(self, accelerator: Accelerator, scaler=None, stop: bool = False) -> Optional[WindowStats]:
        """Everything since the last flush, summed over processes, read with one host sync.
        ``stop`` is this process's stop request (a host value); ``WindowStats.stop`` is true when
        any process made one, the same on every process."""
        if not self.steps:
            return None
        n = len(self.steps)
        tokens = torch.stack(self._tokens).sum() if self._tokens else torch.zeros((), device=self.device)
        parts = [torch.stack(self._losses), torch.stack(self._norms), torch.stack(self._bad).float(),
                 torch.stack(self._overflow).float(), tokens.float().reshape(1)]  # fmt: skip
        scale = scaler._get_scale_async() if scaler is not None else None
        if scale is not None:
            parts.append(scale.float().reshape(1).to(self.device))
        # Last: the stop flag, filled on the device (no host-to-device copy), in the same reduce.
        parts.append(torch.full((1,), float(stop), device=self.device))
        values = torch.cat([p.to(self.device) for p in parts])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        values = values.tolist()  # the one device-to-host synchronisation of the window
        procs = accelerator.num_processes
        stats = WindowStats(
            steps=self.steps,
            lrs=self.lrs,
            losses=[v / procs for v in values[:n]],
            norms=[v / procs if has else None for v, has in zip(values[n : 2 * n], self._has_norm)],
            bad_steps=[s for s, v in zip(self.steps, values[2 * n : 3 * n]) if v > 0],
            overflow_steps=sum(v > 0 for v in values[3 * n : 4 * n]),
            tokens=int(values[4 * n]),
            loss_scale=values[4 * n + 1] / procs if scale is not None else None,
            stop=values[-1] > 0,
        )
        self.steps, self.lrs, self._losses, self._norms, self._bad, self._overflow, self._tokens = [], [], [], [], [], [], []
        self._has_norm = []
        return stats


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and stops. A second one
    restores the handlers found on entry and raises KeyboardInterrupt at once.

    A checkpoint is collective (barriers, save_state) and a signal reaches each process at its own
    moment, so only a lone process acts on its own flag at once (``now``: a host value, no device
    sync). Several processes fold their flags into the reduce StepWindow.flush does at the next log
    point (at most train.log_every steps later) and all stop on the sum, at the same step."""

    def __init__(self, num_processes: int):
        self.signal: Optional[str] = None
        self.alone = num_processes == 1
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def now(self) -> bool:
        return self.requested and self.alone

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:  # a second signal: the user will not wait for the step and its checkpoint
            self.__exit__()
            logger.warning("%s again: stopping at once, without a checkpoint.", name)
            raise KeyboardInterrupt(name)
        self.signal = name
        logger.warning("%s: finishing this step, writing a checkpoint and stopping (send it again to stop at once).",
                       name)  # fmt: skip

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_finite(accelerator: Accelerator, params: Iterable[torch.Tensor]) -> bool:
    """Whether the parameters of every process are finite (under FSDP each process holds its own
    shard): one flag per process, summed over processes, one host read; every process gets the
    same answer, so none raises while the others wait in a checkpoint's collectives."""
    flags = [p.isfinite().all().to(accelerator.device) for p in params]
    finite = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=accelerator.device)
    bad = (~finite).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def active_scaler(accelerator: Accelerator):
    """accelerate's fp16 GradScaler, when one is in charge of the gradients (not under DeepSpeed,
    which scales inside its engine)."""
    return getattr(accelerator, "scaler", None)


class BestWeights:
    """The best evaluation's weights. Where every process holds the whole model (one process, DDP):
    a CPU copy of the trained parameters, restored by name. Under FSDP / DeepSpeed parameters are
    sharded and renamed (``_fsdp_wrapped_module.``), so a copy by name may restore nothing: there
    the best weights are an accelerate state folder (``folder``, checkpoints/best-state/), written
    and restored shard by shard by the engine (``save_state`` / ``load_state``). Either form goes
    into every step checkpoint and comes back from the one a run resumes, so a run only ever
    restores a best it kept itself or inherited from its checkpoint."""

    def __init__(self, accelerator: Accelerator, folder: Path, names: Optional[set] = None):
        self.accelerator, self.folder, self.names = accelerator, Path(folder), names
        self.sharded = accelerator.distributed_type in SHARDED_ENGINES
        self.state: Optional[Dict[str, torch.Tensor]] = None
        self._in_folder = False  # sharded: ``folder`` holds this run's best

    @property
    def kept(self) -> bool:
        return self.state is not None or self._in_folder

    @property
    def saved(self) -> Union[Dict[str, torch.Tensor], Path, None]:
        """What a step checkpoint stores: the in-memory copy, the state folder, or None (no best yet)."""
        return self.folder if self._in_folder else self.state

    def start(self, saved: Union[Dict[str, torch.Tensor], Path, None], record: Optional[dict],
              checkpoint: Optional[Path]) -> None:  # fmt: skip
        """Begin a run with the best stored in the checkpoint it resumes (``saved`` as load_checkpoint
        returns it, ``record`` its evaluation) or, starting afresh, with none. A best-state folder
        left by an earlier run or a later point of this one is removed: it belongs to no checkpoint.

        Raises:
            ResumeError: the checkpoint records a best but holds none in this engine's form.
        """
        wanted = Path if self.sharded else dict
        if record is not None and not isinstance(saved, wanted):
            raise ResumeError(
                f"{checkpoint} records a best evaluation (step {record.get('step')}) but holds no best weights "
                f"this engine can restore ({'a best-state/ folder' if self.sharded else 'best.safetensors'}): it "
                "was written by an earlier finetune, or under another engine (FSDP / DeepSpeed keep best-state/, "
                "one process and DDP best.safetensors). Resume under the engine that wrote it, or start a new run."
            )
        if not self.sharded:
            self.state = saved if record is not None else None
            return
        acc = self.accelerator
        if acc.is_main_process:
            _remove(self.folder)
            if record is not None:
                link_tree(saved, self.folder)
        acc.wait_for_everyone()
        self._in_folder = record is not None

    def keep(self, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """Remember the current weights; returns the in-memory copy (None when sharded)."""
        if not self.sharded:
            self.state = trainable_state(self.accelerator.unwrap_model(model), self.names)
            return self.state
        # Replaced, never written in place: checkpoints hold hard links to the older files.
        save_state_atomically(self.accelerator, self.folder)
        self._in_folder = True
        return None

    def restore(self, model: nn.Module) -> None:
        if not self.sharded:
            load_trainable_state(self.accelerator.unwrap_model(model), self.state)
        else:
            self.accelerator.load_state(str(self.folder))


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


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
        batch.pop(TEACHER_LOGITS, None)  # distillation's extra target: the task loss probes the same memory
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
