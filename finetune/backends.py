"""Inference backends for finetune.predict and the export check: each turns one padded batch
(numpy arrays named as the tokenizer names them) into a numpy array of logits.

``TorchBackend`` runs a saved ``model/`` folder (full model or adapter) with PyTorch;
``OnnxBackend`` runs the ``model.onnx`` of a folder written by ``finetune.export`` with ONNX
Runtime. Both see the same encoded batches (finetune.predict prepares them), so the backends
differ in the arithmetic only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from finetune.config import FinetuneError

ONNX_FILE = "model.onnx"
BACKENDS = ("auto", "torch", "onnx")
DEVICES = ("auto", "cpu", "cuda")


class BackendError(FinetuneError):
    """A model folder that the chosen backend cannot run."""


# What a folder holds when transformers / peft can load it with PyTorch (a full model, sharded or
# not, or an adapter); an ONNX export (model.onnx) holds none of them.
TORCH_WEIGHTS = ("*.safetensors", "*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def has_torch_weights(model_dir: str) -> bool:
    return any(any(Path(model_dir).glob(pattern)) for pattern in TORCH_WEIGHTS)


class TorchBackend:
    """A saved finetune model (full or adapter) in evaluation mode."""

    name = "torch"

    def __init__(self, model_dir: str, threads: Optional[int] = None, device="auto"):
        import torch

        from finetune.model import load_saved_model

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model = load_saved_model(model_dir).eval().to(self.device)
        self.config = self.model.config

    def __call__(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.no_grad():
            inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}
            return self.model(**inputs).logits.float().cpu().numpy()


def resolve_device(device):
    """``auto``: the GPU when one is present, else the CPU; a ``torch.device`` (a run's
    ``accelerator.device``, e.g. cuda:1) is taken as it is."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise BackendError(f"device={device!r} is not one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# Batches a throughput job runs at once (each holds its activations): more CPUs go to each batch.
MAX_PARALLEL_BATCHES = 4


class OnnxBackend:
    """An exported ``model.onnx`` in an ONNX Runtime CPU session."""

    name = "onnx"
    # ONNX Runtime's intra-op threads spin between calls by default: the fastest for back-to-back
    # batches (finetune.predict), but a server's model thread idles between batches, and spinning
    # threads take the cores its event loop needs (finetune.serve turns it off).
    spin = True

    def __init__(self, model_dir: str, threads: Optional[int] = None, parallel_batches: bool = False):
        """``parallel_batches``: a throughput job (finetune.predict) runs up to MAX_PARALLEL_BATCHES
        batches side by side (``workers``; predict.ordered_outputs feeds them), the ``threads``
        (default: the CPUs this process may use) shared out among them as intra-op threads: an
        encoder graph is many small nodes, and each node split across threads pays a hand-off (the
        per-token int8 graph ran 2,000 SST-2 rows in 4.2 s with 2 batches on 1 thread each, 5.0 s
        one batch at a time on 2 threads). Otherwise one call at a time on ``threads`` intra-op
        threads (ONNX Runtime's default when None)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "backend=onnx needs onnxruntime, which is not installed; install it with "
                "pip install -e '.[export]' (or pip install onnxruntime)."
            ) from None
        options = ort.SessionOptions()
        self.workers = 1
        if parallel_batches:
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            cpus = threads or usable
            self.workers = min(cpus, MAX_PARALLEL_BATCHES)
            options.intra_op_num_threads = max(cpus // self.workers, 1)
        elif threads:
            options.intra_op_num_threads = threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(Path(model_dir) / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = SavedConfig(model_dir)

    def __call__(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names}
        return self.session.run(["logits"], feed)[0].astype(np.float32)


class SavedConfig:
    """The fields of a folder's config.json that inference reads (the label maps, problem_type,
    architectures, the input limit's fields), as ``AutoConfig`` gives them, read as plain JSON:
    transformers' configuration classes import torch, seconds of an ONNX process that never
    needs it. Other fields are attributes as they are in the file (AttributeError when absent)."""

    def __init__(self, model_dir: str):
        import json

        fields = json.loads((Path(model_dir) / "config.json").read_text())
        # As PretrainedConfig: id2label keyed by int; without one, num_labels (default 2) LABEL_i names.
        id2label = fields.get("id2label") or {i: f"LABEL_{i}" for i in range(fields.get("num_labels", 2))}
        self.__dict__.update(fields, id2label={int(i): name for i, name in id2label.items()})
        self.__dict__.setdefault("problem_type", None)
        self.__dict__.setdefault("architectures", None)
        self.__dict__.setdefault("model_type", "")
        self.__dict__.setdefault("pad_token_id", None)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def choose_backend(model_dir: str, backend: str = "auto") -> str:
    """torch or onnx for ``model_dir``: auto picks onnx when the folder holds a model.onnx."""
    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r} is not one of {list(BACKENDS)}.")
    has_onnx = (Path(model_dir) / ONNX_FILE).is_file()
    if backend == "auto":
        return "onnx" if has_onnx else "torch"
    if backend == "onnx" and not has_onnx:
        raise BackendError(
            f"backend=onnx but '{model_dir}' holds no {ONNX_FILE}; export the model first with "
            f"python -m finetune.export model=... format=onnx output=DIR, and pass model=DIR."
        )
    if backend == "torch" and has_onnx and not any(Path(model_dir).glob("*.safetensors")):
        raise BackendError(
            f"backend=torch but '{model_dir}' holds only an ONNX export (no PyTorch weights); use backend=onnx, "
            "or pass the run's model/ folder."
        )
    return backend


def open_backend(model_dir: str, backend: str = "auto", threads: Optional[int] = None, device: str = "auto",
                 parallel_batches: bool = False):  # fmt: skip
    """The backend that runs ``model_dir`` (see ``choose_backend``); ONNX Runtime runs on the CPU
    (with ``parallel_batches``, several batches at once: OnnxBackend)."""
    chosen = choose_backend(model_dir, backend)
    if chosen == "onnx":
        if device == "cuda":
            raise BackendError("device=cuda runs the PyTorch backend only; use backend=torch, or device=auto/cpu.")
        return OnnxBackend(model_dir, threads, parallel_batches)
    return TorchBackend(model_dir, threads, device)
