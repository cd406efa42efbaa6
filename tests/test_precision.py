"""The precisions users get, run on this CPU: `train.mixed_precision=auto` as this machine resolves it,
auto made to resolve to bf16 from the test side (as on a CPU with AVX512-BF16 / AMX or a recent GPU;
bf16 autocast is emulated on AVX2, which a tiny model affords), and fp16 autocast with torch's CPU
GradScaler (accelerate refuses fp16 on CPUs: the stand-in of tests/test_engine.py). Whatever training
ran in, the numbers a run reports describe its saved model: predictions/validation.tsv,
finetune.predict and transformers.pipeline on model/ agree to 1e-5."""

import csv
import json

import numpy as np
import pytest

import finetune.cli
from finetune.cli import resolve_mixed_precision
from finetune.predict import predict, read_rows
from test_e2e import ModelSpy, run_in_process, tiny_overrides, train_toy_run
from test_engine import fp16_on_cpu, patch_accelerator

LEGS = ["auto", "bf16", "fp16"]


def force_cpu_bf16(monkeypatch) -> None:
    """auto resolves as on a CPU with native bf16, whatever this one has."""
    monkeypatch.setattr(finetune.cli, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture(scope="module", params=LEGS)
def leg_run(request, tiny_bert, tmp_path_factory):
    """(run directory, toy files, the precision training ran in, the model spy) per leg."""
    leg = request.param
    with pytest.MonkeyPatch.context() as mp:
        spy = ModelSpy(mp)
        if leg == "bf16":
            force_cpu_bf16(mp)
        if leg == "fp16":
            patch_accelerator(mp, fp16_on_cpu(init_scale=2.0**8))
        out, files = train_toy_run(tiny_bert, tmp_path_factory.mktemp(f"precision-{leg}"), "logger=none", "plots=false")
    expected = {"auto": resolve_mixed_precision("auto", force_cpu=True), "bf16": "bf16", "fp16": "fp16"}[leg]
    return out, files, expected, spy


def read_table(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_the_run_records_and_uses_the_precision_it_trained_in(leg_run):
    out, _, expected, spy = leg_run
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["mixed_precision"] == expected
    half = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(expected, "torch.float32")
    train_dtypes = {str(d) for training, d in spy.head_dtypes if training}
    assert train_dtypes == {half}, train_dtypes  # the leg really trained in that precision
    # Evaluations during training ran as training did; the last forward passes (the kept weights'
    # validation, in full precision) ran in fp32.
    eval_dtypes = [str(d) for training, d in spy.head_dtypes if not training]
    assert half in eval_dtypes and eval_dtypes[-1] == "torch.float32"


def test_tables_predict_and_pipeline_agree_on_the_saved_model(leg_run):
    from transformers import pipeline

    out, files, _, _ = leg_run
    table = read_table(out / "predictions" / "validation.tsv")
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in table])
    got = predict(str(out), read_rows(files["validation"]), progress=False)
    assert [g["prediction"] for g in got] == [r["prediction"] for r in table]
    np.testing.assert_allclose([[g["prob_negative"], g["prob_positive"]] for g in got], probs, atol=1e-5)
    clf = pipeline("text-classification", model=str(out / "model"), top_k=None)
    scored = clf([r["text"] for r in table], batch_size=8)
    piped = np.array([[next(s["score"] for s in row if s["label"] == name) for name in ("negative", "positive")]
                      for row in scored])  # fmt: skip
    np.testing.assert_allclose(piped, probs, atol=1e-5)
    # metrics.json's best (the kept weights' validation) counts the table's own rows.
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert best["accuracy"] == pytest.approx(np.mean([r["label"] == r["prediction"] for r in table]))


def test_runs_of_different_precision_follow_each_other_in_one_process(tiny_bert, toy_files, tmp_path):
    """A notebook user's Accelerator, then a bf16 run, then an fp32 run, in one process."""
    from accelerate import Accelerator

    Accelerator(cpu=True)  # fixes the process-wide AcceleratorState to fp32
    for i, precision in enumerate(["bf16", "no", "bf16"]):
        out = tmp_path / f"run{i}"
        run_in_process(tiny_overrides(tiny_bert, toy_files, out, f"train.mixed_precision={precision}",
                                      "train.max_steps=2", "logger=none", "plots=false"))  # fmt: skip
        assert json.loads((out / "metrics.json").read_text())["mixed_precision"] == precision
