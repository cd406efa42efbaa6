"""Export a trained model to ONNX, checked against PyTorch before it is called done.

    python -m finetune.export model=outputs/run format=onnx output=exported/
    python -m finetune.export model=outputs/run/model format=onnx quantize=int8 output=exported-int8/

``model`` is a run directory or a model folder (full model or adapter: an adapter is merged into
its base first). ``output`` receives model.onnx (dynamic batch and sequence axes), the tokenizer,
config.json with the label names and finetune.json (task, threshold, text columns, max length,
the tokenizer's class, and how the export was checked). ``python -m finetune.predict
model=output`` runs it with ONNX Runtime.

The check runs PyTorch and ONNX Runtime on the same rows, encoded and batched exactly as
finetune.predict does (the task's ``export_check``, finetune.export_check): the run's
predictions/validation.tsv texts (the first ``check_rows``), the rows of ``check_input=FILE`` (read
as finetune.predict reads its input: a csv / tsv without a header row with the run's
data.column_names), or, for a model folder without a run, a built-in set of English sentences; for
a token-classification model the sentences of predictions/validation.jsonl (or check_input's word
lists, or text split at white space). fp32 must match PyTorch within 1e-4 on every logit (of every
token); int8 must give the same label on at least 99% of the rows (1,000 rows by default: near 99%,
256 rows would leave a standard error of 0.6 points and pass or fail by chance), or for a token
model the same tag on 99% of the words (one decision each); the F1 of its entities against
PyTorch's is measured and recorded beside it (an entity changes with any of its words, and a
boundary moved counts against two). A failed check leaves no export behind (an earlier export in ``output`` is kept).

int8 quantizes the MatMuls with constant weights (the encoder's projections: nearly all the
time): int8 weights per output channel (one scale per tensor cost MiniLM's teacher 99.2% -> 97.7%
agreement), activations quantized per token at run time by nodes in the graph
(finetune.onnx_graph.quantize_int8), so that a row's logits do not depend on the rows batched with
it: ONNX Runtime's dynamic quantization takes one activation scale per batch, and a served row
could get another label than finetune.predict gave it (14 of 2,000 did). A few
large activation channels (the GELU output before each FFN output projection, the LayerNorm outputs
before the attention and FFN inputs) make one scale per token coarse for all the others; before
quantizing, the inputs of every weight MatMul of the encoder are smoothed (SmoothQuant:
X W = (X / s)(s W), with s = max|X|^0.9 / max|W|^0.1 per input channel, the activation maxima
measured on calibration rows that are not check rows where the run has them), which is exact in
fp32. Smoothing the FFN output projections lifted a 3-layer MiniLM student from 98.8% to 99.2%
agreement on all 6,735 SST-2 validation rows; smoothing every encoder MatMul took the README-size
run (2,000 rows, one epoch: 5% of its rows within 0.1 of the threshold) from 99.09% to 99.41%
(61 -> 40 flipped rows of 6,735; BENCHMARKS.md), clear of the 99% rule it had met with one row
to spare on its own 500 check rows. Always fp32: the
embedding lookups (int8 tables cost accuracy and gain no time), the pooler and classifier (run once
per row; a token model's classifier, a few outputs per token, too) and the attention itself. If the check fails, the FFN output projections, then the first,
then the last layer are put back in fp32, one more each try, until it passes (at most 4
quantizations); finetune.json's ``int8_kept_fp32`` says what stayed fp32 and ``int8_smoothed`` what
was smoothed. A model whose fp32 graph nears 2 GB (protobuf cannot write a 2 GB file) keeps its
weights in a .data file beside each graph made from it, model.onnx.data for the int8 model.

The graph is exported at opset 23, whose Attention operator ONNX Runtime (>= 1.23) runs as one
kernel per layer (scaled_dot_product_attention maps onto it; opset 18 spells it out in ~12 ops),
fed [batch, sequence, hidden] directly (finetune.onnx_graph.attention_3d drops the exporter's
head-splitting reshapes and transposes around it); the fp32 check judges the rewritten graph.

Options (key=value): model=DIR, output=DIR, format=onnx, quantize=none|int8, check_rows=N (1000),
check_input=FILE, opset=N (23; 18 to 23). Out-of-range options fail before anything is loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from finetune.backends import ONNX_FILE, OnnxBackend, TorchBackend
from finetune.config import FinetuneError
from finetune.export_check import BUILTIN_SENTENCES, CHECK_BATCH_SIZE, CheckError, max_abs_diff
from finetune.model import input_limit, is_peft_model, merge_adapter
from finetune.onnx_graph import (attention_3d, drop_unreferenced_data, encoder_matmuls, int8_fp32_steps, move_graph,
                                 needs_external_data, quantize_int8, smooth_inputs)  # fmt: skip
from finetune.predict import encoded_batches, parse_options, resolve_model_dir, run_command
from finetune.ranges import Range, option_problems
from finetune.tasks import all_tasks, get_task, model_task

OPTIONS = ("model", "output", "format", "quantize", "check_rows", "check_input", "opset")
FP32_MAX_LOGIT_DIFF = 1e-4
INT8_MIN_LABEL_AGREEMENT = 0.99
DEFAULT_CHECK_ROWS = 1000
DEFAULT_OPSET = 23  # the Attention operator (ONNX Runtime >= 1.23 has its CPU kernel)
FALLBACK_OPSET = 18
# int8 smoothing of the encoder's weight MatMuls' inputs: the share of each channel's range moved
# into the weights (SmoothQuant's alpha), measured on this many rows.
SMOOTHING_ALPHA = 0.9
CALIBRATION_ROWS = 256
# Below 18 the dynamo exporter has no opset of its own; above 23, torch 2.13 has none.
OPTION_RANGES = {
    "check_rows": Range(lo=1, note="the export is checked on at least one row"),
    "opset": Range(lo=FALLBACK_OPSET, hi=DEFAULT_OPSET, note="23 needs ONNX Runtime >= 1.23; 18 runs on older ones"),
}


class ExportError(FinetuneError):
    """A model that cannot be exported, or an export that failed its check against PyTorch."""


@dataclass
class ExportReport:
    output: str
    quantize: Optional[str]
    exporter: str
    check_rows: int
    check_source: str
    max_abs_logit_diff: float  # fp32 ONNX vs PyTorch, always measured
    # The int8 model vs PyTorch (None for fp32 exports): the share of the check's rows (of its
    # words, for token classification) decided the same, and the F1 of its entities against PyTorch's.
    label_agreement: Optional[float]
    seconds: float
    int8_kept_fp32: Optional[str] = None  # the parts left in fp32 by the int8 export
    int8_smoothed: Optional[str] = None  # the MatMuls whose inputs were smoothed before quantizing
    entity_agreement: Optional[float] = None
    agreement_unit: str = "rows"


def export_onnx(
    model_ref: str,
    output: str,
    quantize: Optional[str] = None,
    check_rows: int = DEFAULT_CHECK_ROWS,
    check_input: Optional[str] = None,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Export ``model_ref`` to ``output``/model.onnx (+ tokenizer, config, finetune.json) and check it.

    Raises:
        ExportError: an option out of range, no model at ``model_ref``, a checkpoint without a classification head, an
            architecture the ONNX exporter cannot trace, or a check that fails.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    problems = option_problems({"check_rows": check_rows, "opset": opset}, OPTION_RANGES)
    if quantize not in (None, "int8"):
        problems.append(f"quantize={quantize!r} is not supported; use quantize=int8 or leave it out (fp32).")
    if problems:
        raise ExportError(" ".join(problems))
    model_dir, meta = _model_folder(model_ref)
    problem = get_task(meta["task"]).export_problem() if meta.get("task") else None
    if problem:
        raise ExportError(problem)
    out = Path(output)
    if (out.exists() and not out.is_dir()) or (out.is_dir() and any(out.iterdir()) and not (out / ONNX_FILE).is_file()):
        raise ExportError(f"output='{output}' exists and is not an earlier export; choose a new or empty folder.")

    _check_architecture(model_dir)
    try:
        # On the CPU whatever GPU is present: the exporters trace with CPU example inputs, and
        # ONNX Runtime (the check's other side) runs on the CPU.
        torch_model = TorchBackend(model_dir, device="cpu")
    except (OSError, ValueError, KeyError) as err:  # what transformers / peft raise for unreadable folders
        raise ExportError(f"model='{model_ref}' could not be loaded with PyTorch: {err}") from None
    model = torch_model.model
    model = (merge_adapter(model) if is_peft_model(model) else model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = _export_meta(meta, model.config, tokenizer)
    check = get_task(meta["task"]).export_check(tokenizer, meta)
    try:
        rows, source = check.rows(model_ref, model_dir, check_rows, check_input, extra=CALIBRATION_ROWS if quantize else 0)
    except CheckError as err:
        raise ExportError(str(err)) from None
    rows, extra = rows[:check_rows], rows[check_rows:]

    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)  # OnnxBackend reads the label maps from it
        tokenizer.save_pretrained(tmp)
        reference = check.outputs(torch_model, rows)
        exporter, opset, max_diff = _export_checked(model, reference, check, tmp, opset, rows, source)
        agreement, kept_fp32, smoothed = {"label_agreement": None}, None, None
        if quantize == "int8":
            agreement, kept_fp32, smoothed = _quantize_and_check(tmp, reference, check, rows, source, extra)
        report = ExportReport(str(out), quantize, exporter, len(rows), source, max_diff, seconds=0.0,
                              int8_kept_fp32=kept_fp32, int8_smoothed=smoothed, agreement_unit=check.unit,
                              **agreement)  # fmt: skip
        report.seconds = time.perf_counter() - start
        meta["export"] = {"format": "onnx", "opset": opset, **{k: v for k, v in asdict(report).items() if k != "output"}}
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():  # an earlier export: replaced only now that the new one passed
            shutil.rmtree(out)
        tmp.rename(out)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_folder(model_ref: str) -> tuple[str, dict]:
    if not Path(model_ref).exists():
        raise ExportError(
            f"model='{model_ref}' does not exist; give a run directory (outputs/...) or its model/ folder. "
            "Hub ids are not exported directly: fine-tune or download the model first."
        )
    try:
        return resolve_model_dir(model_ref)
    except FinetuneError as err:
        raise ExportError(str(err)) from None


def _check_architecture(model_dir: str) -> None:
    """A full model folder must hold one of the tasks' heads (adapter folders name their base only)."""
    config_file = Path(model_dir) / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
    if architectures and not any(task.has_head(architectures) for task in all_tasks()):
        raise ExportError(
            f"model='{model_dir}' is a {', '.join(architectures)} checkpoint, not a classifier: it "
            "has no trained classification head to export. Export a model trained by finetune (a run "
            "directory or its model/ folder)."
        )


def _export_meta(meta: dict, config, tokenizer) -> dict:
    """finetune.json for the export: the run's (task, threshold, columns, max length), or what a
    plain transformers folder's config says (its task by problem_type or head, the longest input
    it takes: checked and predicted at that length), always with the label maps; the weights are merged."""
    id2label = {int(i): n for i, n in config.id2label.items()}
    # A plain transformers folder (a Hub NER model: no finetune.json, no problem_type) by its head.
    task = model_task(meta.get("task"), config.problem_type, config.num_labels, config.architectures or ()).name
    base = {"id2label": {str(i): n for i, n in id2label.items()}, "label2id": {n: i for i, n in id2label.items()},
            "num_labels": len(id2label), "task": task, "max_length": input_limit(config, tokenizer)}  # fmt: skip
    # The class AutoTokenizer chose, which finetune.predict loads directly (predict.load_tokenizer).
    return {**base, **meta, "adapter": False, "tokenizer_class": type(tokenizer).__name__}


EXPORTERS = ("dynamo", "torchscript")


def _export_checked(model, reference, check, tmp: Path, opset: int, rows, source) -> tuple[str, int, float]:
    """Export with the first exporter whose graph matches PyTorch within FP32_MAX_LOGIT_DIFF on
    every logit of the check rows: (exporter, opset, max |logit difference|).

    The dynamo exporter (torch's default) comes first, at ``opset`` and then, when that is above
    FALLBACK_OPSET, at FALLBACK_OPSET: at opset 23 it maps ModernBERT's rotary embedding onto the
    RotaryEmbedding operator with caches ONNX Runtime 1.32 rejects. The TorchScript exporter is ten
    times faster on these encoders but, under torch 2.13, gave a trained tiny BERT's logits off by
    0.08 (its embeddings come out wrong), so it is only the last resort; the check decides either way.
    """
    heads = getattr(model.config, "num_attention_heads", None)
    head_dim = (getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
                if heads and getattr(model.config, "hidden_size", None) else None)  # fmt: skip
    attempts = []
    tries = [(e, o) for e in EXPORTERS for o in dict.fromkeys([opset] + ([FALLBACK_OPSET] if e == "dynamo" else []))
             if o <= opset]  # fmt: skip
    for exporter, version in tries:
        name = exporter if len(tries) == len(EXPORTERS) else f"{exporter} (opset {version})"
        try:
            _export_graph(model, check, tmp / ONNX_FILE, version, exporter)
            if head_dim:
                attention_3d(tmp / ONNX_FILE, heads, head_dim)
            max_diff = max_abs_diff(reference, check.outputs(OnnxBackend(str(tmp)), rows))
        except Exception as err:  # exporters and ONNX Runtime raise many types; the message lists them
            first_line = (re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines() or [""])[0][:300]  # no colours
            attempts.append(f"{name} exporter failed ({type(err).__name__}: {first_line})")
            continue
        if max_diff <= FP32_MAX_LOGIT_DIFF:
            return exporter, version, max_diff
        attempts.append(f"{name} exporter's logits differ from PyTorch by up to {max_diff:.3g}")
    import torch

    raise ExportError(
        f"no ONNX exporter of torch {torch.__version__} gave a faithful graph of the {type(model).__name__} "
        f"({model.config.model_type}) model: {'; '.join(attempts)}. An fp32 export must match PyTorch within "
        f"{FP32_MAX_LOGIT_DIFF} on every logit of the {len(rows)} {source}. This architecture is not supported "
        "for export; serve it with finetune.predict backend=torch. Nothing was written."
    )


def _export_graph(model, check, path: Path, opset: int, exporter: str) -> None:
    """Trace ``model`` into ``path`` with dynamic batch and sequence axes (the logits' as the
    check's task names them). The example batch is padded, so that the graph keeps the
    attention-mask path that padded batches need."""
    import torch

    tokenizer, meta = check.tokenizer, check.meta

    example_rows = [{"text": BUILTIN_SENTENCES[0]}, {"text": BUILTIN_SENTENCES[5]}]
    pair = "text_pair" if meta.get("text_pair_column") else None
    if pair:
        example_rows = [{"text": BUILTIN_SENTENCES[0], "text_pair": "fine."}, {"text": "meh", "text_pair": "boring"}]
    _, batch = next(encoded_batches(tokenizer, example_rows, "text", pair, meta.get("max_length"), CHECK_BATCH_SIZE))
    inputs = {name: torch.from_numpy(batch[name]) for name in batch}
    names = list(inputs)
    if exporter == "dynamo":
        axes = {n: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for n in names}
        kwargs = dict(dynamo=True, dynamic_shapes=axes)
    else:
        axes = {**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": dict(enumerate(check.task.logit_axes))}
        kwargs = dict(dynamo=False, dynamic_axes=axes)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: the check judges the graph
        torch.onnx.export(model, (), str(path), kwargs=inputs, input_names=names, output_names=["logits"],
                          opset_version=opset, verbose=False, **kwargs)  # fmt: skip


def _quantize_and_check(tmp: Path, reference, check, rows, source: str,
                        extra: Sequence[dict] = ()) -> tuple[Dict[str, float], str, Optional[str]]:  # fmt: skip
    """Replace tmp/model.onnx by its int8 quantization (onnx_graph.quantize_int8): (the check's agreement with PyTorch:
    ``label_agreement``, at least INT8_MIN_LABEL_AGREEMENT, the share of rows whose label, under the
    run's decision rule and threshold, is PyTorch's, or for token models of words whose tag is, and
    for token models ``entity_agreement``, recorded; what was kept in fp32; what was smoothed).

    All weight MatMuls are quantized first, the encoder's weight MatMuls' inputs smoothed on
    CALIBRATION_ROWS rows: the ``extra`` rows (not check rows) first, topped up with check rows;
    while the check fails, the parts of
    onnx_graph.INT8_FP32_STEPS are put back in fp32 one more at a time (a quantization and a check each)."""
    fp32 = tmp / "model.fp32.onnx"
    move_graph(tmp / ONNX_FILE, fp32)  # its weights out of the way of the int8 graph's (model.onnx.data)
    external = needs_external_data(fp32)  # a model over ~2 GB: every graph made here keeps its weights in a .data file
    steps = int8_fp32_steps(fp32)
    encoder = encoder_matmuls(fp32)
    smoothed = tmp / "model.smoothed.onnx"
    calibration = (list(extra) + list(rows))[:CALIBRATION_ROWS]
    smooth_inputs(fp32, smoothed, encoder, check.batches(calibration), SMOOTHING_ALPHA, external)
    fresh = min(len(extra), CALIBRATION_ROWS)
    smoothing = (f"the encoder's weight MatMuls (alpha {SMOOTHING_ALPHA}, {len(calibration)} calibration rows, {fresh} "
                 "of them not check rows)" if encoder else None)  # fmt: skip
    tried = []
    for n_kept in range(len(steps) + 1):
        kept = [node for _, nodes in steps[:n_kept] for node in nodes]
        quantize_int8(fp32 if n_kept else smoothed, tmp / ONNX_FILE, kept, external)  # smoothing: int8 MatMuls only
        agreement = check.agreement(rows, reference, check.outputs(OnnxBackend(str(tmp)), rows))
        kept_names = ", ".join(name for name, _ in steps[:n_kept]) or "nothing"
        tried.append(f"{check.describe(agreement)} with {kept_names} in fp32")
        if agreement["label_agreement"] >= INT8_MIN_LABEL_AGREEMENT:
            fp32.unlink()
            smoothed.unlink()
            drop_unreferenced_data(tmp / ONNX_FILE)  # the fp32 and smoothed graphs' external weights
            return agreement, kept_names, None if n_kept else smoothing
    raise ExportError(
        f"the int8 model gives {check.decision} on only {check.describe(agreement)} of {len(rows)} {source} "
        f"(required: {INT8_MIN_LABEL_AGREEMENT:.0%}; tried {'; '.join(tried)}); quantization costs this model too much. "
        "Export fp32 (leave out quantize=int8). Nothing was written."
    )


def parse_args(argv: List[str]) -> Dict[str, object]:
    args = parse_options(argv, OPTIONS, ("model", "output"), "python -m finetune.export model=RUN_DIR format=onnx "
                         "output=DIR", error=ExportError, types={"check_rows": int, "opset": int})  # fmt: skip
    if args.setdefault("format", "onnx") != "onnx":
        raise ExportError(f"format={args['format']!r} is not supported; the one export format is format=onnx.")
    if args.get("quantize") in ("none", "null", ""):
        args["quantize"] = None
    return args


def main(argv: Optional[List[str]] = None) -> None:
    run_command("finetune.export", __doc__, argv, _export_command)


def _export_command(argv: List[str]) -> None:
    args = parse_args(argv)
    kwargs = {k: args[k] for k in ("quantize", "check_rows", "check_input", "opset") if k in args}
    print(describe(export_onnx(str(args["model"]), str(args["output"]), **kwargs)))


def describe(report: ExportReport) -> str:
    line = (f"Exported {'int8' if report.quantize else 'fp32'} ONNX to {report.output} ({report.exporter} exporter, "
            f"{report.seconds:.1f} s). Checked on {report.check_rows} {report.check_source}: max |logit difference| "
            f"{report.max_abs_logit_diff:.2g} (fp32)")  # fmt: skip
    if report.label_agreement is not None:
        entities = "" if report.entity_agreement is None else f", entity F1 against PyTorch's {report.entity_agreement:.1%}"
        line += (f", same label as PyTorch on {report.label_agreement:.1%} of {report.agreement_unit}{entities} (int8; "
                 f"kept in fp32: {report.int8_kept_fp32}; smoothed: {report.int8_smoothed or 'nothing'})")  # fmt: skip
    return line + "."


if __name__ == "__main__":
    main()
