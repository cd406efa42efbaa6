"""finetune.export: ONNX (fp32 and int8) checked against PyTorch; finetune.predict backend=onnx."""

import csv
import json
import shutil

import numpy as np
import pytest

import finetune.export as export
from finetune import onnx_graph
from finetune.export import ExportError, export_onnx
from finetune.export_check import TextCheck, label_agreement
from finetune.predict import predict, read_rows
from test_e2e import train_toy_run

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained_run(tiny_bert, tmp_path_factory):
    """A trained tiny BERT run that exported itself at the end of training (save.export=onnx)."""
    return train_toy_run(tiny_bert, tmp_path_factory.mktemp("export"), "save.export=onnx", "plots=false", "logger=none")


def text_check(tokenizer, meta):
    from finetune.tasks import get_task

    return TextCheck(get_task(meta.get("task") or "single_label_classification"), tokenizer, meta)


def table(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def reference_logits(model_dir, texts):
    """PyTorch logits straight from transformers / peft (not through finetune's backends)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.model import load_saved_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return load_saved_model(model_dir).eval()(**enc).logits.numpy(), {k: v.numpy() for k, v in enc.items()}


def onnx_logits(onnx_dir, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {n: inputs[n].astype(np.int64) for n in names})[0]


def weight_files(onnx_dir):
    """(the *.data files in an export folder, the ones its model.onnx reads its weights from)."""
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    used = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return {p.name for p in onnx_dir.glob("*.data")}, used


def assert_matches_pytorch(model_dir, onnx_dir, texts):
    ref, inputs = reference_logits(model_dir, texts)
    got = onnx_logits(onnx_dir, inputs)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4


def test_training_export_matches_pytorch_and_predict_onnx_reproduces_validation(trained_run):
    out, files = trained_run
    onnx_dir = out / "onnx"
    meta = json.loads((onnx_dir / "finetune.json").read_text())
    assert meta["export"]["check_rows"] == 41  # (the logits are compared below, independently)
    assert meta["task"] == "single_label_classification" and meta["max_length"] == 32 and "threshold" in meta
    assert json.loads((onnx_dir / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    assert (onnx_dir / "tokenizer_config.json").is_file() and not list(onnx_dir.glob("*.safetensors"))

    texts = [r["text"] for r in table(out / "predictions" / "validation.tsv")]
    # Batches of several lengths and sizes than the export example: the axes really are dynamic.
    assert_matches_pytorch(out / "model", onnx_dir, texts[:7])
    assert_matches_pytorch(out / "model", onnx_dir, texts[7:10])

    expected = table(out / "predictions" / "validation.tsv")
    got = predict(str(out), read_rows(files["validation"]), backend="onnx", progress=False)
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]
    assert max(abs(g["prob_positive"] - float(e["prob_positive"])) for g, e in zip(got, expected)) < 1e-4
    # threads=2: two batches side by side, one ONNX Runtime thread each; the same numbers, in order.
    import finetune.predict as predict_module

    seen_workers, in_order = [], predict_module.ordered_outputs

    def spy(runner, batches):
        seen_workers.append((runner.workers, runner.session.get_session_options().intra_op_num_threads))
        return in_order(runner, batches)

    predict_module.ordered_outputs = spy
    try:
        side_by_side = predict(str(onnx_dir), read_rows(files["validation"]), threads=2, batch_size=4, progress=False)
    finally:
        predict_module.ordered_outputs = in_order
    assert seen_workers == [(2, 1)]
    assert [r["prob_positive"] for r in side_by_side] == [r["prob_positive"] for r in
                                                         predict(str(onnx_dir), read_rows(files["validation"]), threads=1,
                                                                 batch_size=4, progress=False)]  # fmt: skip
    # auto: a folder holding model.onnx runs on ONNX Runtime; the run directory on PyTorch.
    from finetune.backends import choose_backend

    assert choose_backend(str(onnx_dir)) == "onnx" and choose_backend(str(out / "model")) == "torch"
    # Opset 23: each layer's attention is one ONNX Attention node (ONNX Runtime's fused kernel).
    import onnx

    nodes = onnx.load(str(onnx_dir / "model.onnx")).graph.node
    attention = [n for n in nodes if n.op_type == "Attention" and n.domain == ""]
    assert len(attention) == 2 and "Softmax" not in {n.op_type for n in nodes}
    # ... fed [batch, sequence, hidden] (tiny BERT: 2 heads): no head-splitting transposes around it.
    assert all({a.name: a.i for a in n.attribute}.keys() >= {"q_num_heads", "kv_num_heads"} for n in attention)
    assert {a.i for n in attention for a in n.attribute if a.name.endswith("num_heads")} == {2}
    assert "Transpose" not in {n.op_type for n in nodes}
    files, used = weight_files(onnx_dir)  # the rewrite kept the weights in their one file
    assert files == used and len(used) == 1


ONNX_PROCESS = """
import json, sys
from finetune.predict import predict, read_rows
rows = predict(sys.argv[1], read_rows(sys.argv[2]), progress=False)
print(json.dumps({"rows": rows, "imported": sorted({"torch", "datasets"} & set(sys.modules))}))
"""


def onnx_process(model, input_file):
    """(finetune.predict's rows, which of torch / datasets it imported) on an ONNX export, in a fresh process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ONNX_PROCESS, str(model), str(input_file)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    return out["rows"], out["imported"]


def test_predict_on_an_export_imports_neither_torch_nor_datasets(trained_run):
    """An ONNX predict process needs a tokenizer and ONNX Runtime only: importing torch (through
    transformers' AutoConfig / AutoTokenizer) and datasets (through finetune.data) took ~4 s of a
    6.5 s process (issue 22, acceptance 5: predict against pipeline as whole processes)."""
    out, files = trained_run
    assert json.loads((out / "onnx" / "finetune.json").read_text())["tokenizer_class"] == "BertTokenizer"
    rows, imported = onnx_process(out / "onnx", files["validation"])
    assert imported == []
    assert rows == predict(str(out / "onnx"), read_rows(files["validation"]), progress=False)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_onnx_backend_reads_config_json_as_autoconfig_does(arch, tmp_path):
    from transformers import AutoConfig

    from finetune.backends import SavedConfig
    from finetune.model import input_limit

    model, tokenizer = tiny_classifier(arch)
    model.config.problem_type = "single_label_classification" if arch == "bert" else None
    model.config.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    for case in ("saved", "no label names"):
        if case == "no label names":  # a hand-written config: num_labels alone names LABEL_0..3
            fields = {k: v for k, v in fields.items() if k not in ("id2label", "label2id")} | {"num_labels": 4}
            (tmp_path / "config.json").write_text(json.dumps(fields))
        ours, theirs = SavedConfig(str(tmp_path)), AutoConfig.from_pretrained(tmp_path)
        for field in ("id2label", "num_labels", "problem_type", "architectures", "model_type", "pad_token_id"):
            assert getattr(ours, field) == getattr(theirs, field), (case, field)
        assert input_limit(ours, tokenizer) == input_limit(theirs, tokenizer)
    assert ours.num_labels == 4 and ours.id2label[3] == "LABEL_3"
    assert ours.hidden_size == theirs.hidden_size and getattr(ours, "no_such_field", None) is None


def test_predict_loads_the_tokenizer_class_the_export_recorded(tmp_path, monkeypatch):
    import transformers

    from finetune.predict import load_tokenizer

    _, tokenizer = tiny_classifier("roberta")  # roberta's inputs: no token_type_ids (tokenizer_config.json says)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the movie was great"
    calls = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def auto(cls, *args, **kwargs):
        calls.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(auto))
    got = load_tokenizer(str(tmp_path), {"tokenizer_class": type(expected).__name__})
    assert calls == [] and type(got) is type(expected) and got(text).data == expected(text).data
    assert "token_type_ids" not in got(text) and set(got(text)["input_ids"]) - {tokenizer.unk_token_id}
    # No record, or a name that is not a tokenizer class of transformers: AutoTokenizer decides.
    for meta in ({}, {"tokenizer_class": "NoSuchTokenizer"}, {"tokenizer_class": "pipeline"},
                 {"tokenizer_class": "AutoModelTokenizer"}):  # fmt: skip
        assert type(load_tokenizer(str(tmp_path), meta)) is type(expected)
    assert len(calls) == 4


def test_int8_cli_export_agrees_on_labels(trained_run, tmp_path, capsys):
    import onnx

    out, files = trained_run
    dest = tmp_path / "int8"
    export.main([f"model={out}/model", "format=onnx", "quantize=int8", "check_rows=20", f"output={dest}"])
    printed = capsys.readouterr().out
    assert "Exported int8 ONNX" in printed and "same label as PyTorch" in printed
    meta = json.loads((dest / "finetune.json").read_text())
    # (the labels are compared below, independently: predict on the int8 model vs training's predictions)
    assert meta["export"]["quantize"] == "int8" and meta["export"]["check_rows"] == 20
    # The smoothing statistics come from the run's other 21 validation rows first (topped up with check rows).
    assert meta["export"]["int8_smoothed"] == \
        "the encoder's weight MatMuls (alpha 0.9, 41 calibration rows, 21 of them not check rows)"
    assert weight_files(dest) == (set(), set())  # int8 weights inline; the fp32 graph's weights not shipped
    nodes = onnx.load(str(dest / "model.onnx")).graph.node
    assert "MatMulIntegerToFloat" in {node.op_type for node in nodes}
    # Per layer one Mul per distinct MatMul input: Q/K/V (one LayerNorm output), attention output, FFN in, FFN out.
    assert sum(node.op_type == "Mul" and node.name.endswith("_smooth") for node in nodes) == 8

    expected = [e["prediction"] for e in table(out / "predictions" / "validation.tsv")]
    got = [g["prediction"] for g in predict(str(dest), read_rows(files["validation"]), progress=False)]
    assert np.mean([g == e for g, e in zip(got, expected)]) >= 0.99


def test_int8_rule_is_enforced(trained_run, tmp_path, monkeypatch):
    """The >= 99% label rule rejects a quantized model (here: a rule no model can meet)."""
    import shutil

    from transformers import AutoTokenizer

    out, _ = trained_run
    shutil.copytree(out / "onnx", tmp_path / "q")
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    rows = [{"text": r["text"]} for r in table(out / "predictions" / "validation.tsv")]
    meta = json.loads((out / "onnx" / "finetune.json").read_text())
    reference = text_check(tokenizer, meta).outputs(export.OnnxBackend(str(out / "onnx")), rows)
    assert export._quantize_and_check(tmp_path / "q", reference, text_check(tokenizer, meta), rows, "rows") == \
        ({"label_agreement": 1.0}, "nothing", "the encoder's weight MatMuls (alpha 0.9, 41 calibration rows, 0 of them not check rows)")
    # Independently: the quantized graph, run here on ONNX Runtime, gives PyTorch's label on every row.
    torch_logits, inputs = reference_logits(out / "model", [r["text"] for r in rows])
    int8_logits = onnx_logits(tmp_path / "q", inputs)
    assert (int8_logits.argmax(-1) == torch_logits.argmax(-1)).all() and meta.get("threshold") in (None, 0.5)
    shutil.copytree(out / "onnx", tmp_path / "r")
    monkeypatch.setattr(export, "INT8_MIN_LABEL_AGREEMENT", 1.01)
    with pytest.raises(ExportError, match=r"int8 model gives PyTorch's label on only 100.0% of 41 rows") as err:
        export._quantize_and_check(tmp_path / "r", reference, text_check(tokenizer, meta), rows, "rows")
    # Each part of the fallback was put back in fp32 in turn before giving up.
    assert "tried 100.0% with nothing in fp32; 100.0% with FFN output projections in fp32; 100.0% with FFN " \
        "output projections, first layer in fp32; 100.0% with FFN output projections, first layer, last layer" in str(err.value)


def test_int8_quantizes_weight_matmuls_per_channel_and_keeps_the_chosen_ones_fp32(trained_run, tmp_path):
    """tiny BERT (2 layers, hidden 32, intermediate 37): the FFN output projections are found (weights
    37 x 32), they stay MatMul when kept; the other weight MatMuls get per-channel int8 weights; the
    embedding lookups stay fp32."""
    import onnx
    from onnx import numpy_helper

    fp32 = trained_run[0] / "onnx" / "model.onnx"
    steps = dict(onnx_graph.int8_fp32_steps(fp32))
    ffn = steps["FFN output projections"]
    graph = onnx.load(str(fp32)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    assert len(ffn) == 2 and all(weights[nodes[name].input[1]].shape == (37, 32) for name in ffn)
    assert len(steps["first layer"]) == len(steps["last layer"]) == 6
    assert steps["first layer"][-1] == ffn[0] and steps["last layer"][-1] == ffn[1]
    # What int8 smooths: every weight MatMul of the two layers, none after them.
    assert onnx_graph.encoder_matmuls(fp32) == steps["first layer"] + steps["last layer"]

    onnx_graph.quantize_int8(fp32, tmp_path / "q.onnx", ffn)
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    q_weights = {i.name: numpy_helper.to_array(i) for i in q.initializer}
    gemms = sorted(n.name for n in graph.node if n.op_type == "Gemm")  # pooler, classifier: fp32
    assert len(gemms) == 2 and sorted(n.name for n in q.node if n.op_type == "Gemm") == gemms
    assert sorted(n.name for n in q.node if n.op_type == "MatMul" and n.input[1] in q_weights) == sorted(ffn)
    integer = [n for n in q.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(integer) == 10 and all(q_weights[n.input[1]].dtype == np.int8 for n in integer)
    assert all(q_weights[n.input[3]].shape == (q_weights[n.input[1]].shape[1],) for n in integer)  # per channel
    # Each int8 weight is its fp32 weight rounded on its output channel's scale (max |w| / 127).
    for n in integer:
        fp32_weight = weights[n.input[1][: -len("_int8")]]
        assert np.abs(q_weights[n.input[1]] * q_weights[n.input[3]] - fp32_weight).max() \
            <= 0.5 * q_weights[n.input[3]].max() + 1e-7  # fmt: skip
    # Activations: one blocked QuantizeLinear per distinct input (Q/K/V share theirs), a block per token.
    quantizers = [n for n in q.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 6 and {a.i for n in quantizers for a in n.attribute if a.name == "block_size"} == {32}
    assert "DequantizeLinear" not in {n.op_type for n in q.node}  # no int8 embedding table (Gather)


def test_int8_logits_of_a_row_do_not_depend_on_its_batch(trained_run, tmp_path):
    """A row's int8 logits are the same alone as in a padded batch with other rows (per-token
    activation scales): a served row gets finetune.predict's answer whatever it was batched with."""
    from transformers import AutoTokenizer

    out, _ = trained_run
    onnx_dir = tmp_path / "int8"
    shutil.copytree(out / "onnx", onnx_dir)
    (onnx_dir / "model.onnx.data").unlink(missing_ok=True)
    onnx_graph.quantize_int8(out / "onnx" / "model.onnx", onnx_dir / "model.onnx", [])
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    meta = json.loads((onnx_dir / "finetune.json").read_text())
    rows = [{"text": r["text"]} for r in table(out / "predictions" / "validation.tsv")]
    check, backend = text_check(tokenizer, meta), export.OnnxBackend(str(onnx_dir))
    batched = check.outputs(backend, rows)
    alone = np.concatenate([check.outputs(backend, [row]) for row in rows])
    assert len({len(r["text"].split()) for r in rows}) > 3  # rows of several lengths: padding in the batch
    assert np.abs(batched - alone).max() < 1e-6  # (0 here; 6e-5 with one activation scale per batch)


def channel_peaks(model, tensors, batches):
    """max |value| per channel (last axis) of each of a graph's ``tensors`` over ``batches``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in tensors)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks = 0.0
    for _, batch in batches:
        values = session.run(tensors, {n: batch[n].astype(np.int64) for n in batch})
        peaks = np.maximum(peaks, np.stack([np.abs(v).reshape(-1, v.shape[-1]).max(axis=0) for v in values]))
    return peaks


def test_smoothing_is_exact_in_fp32_and_scales_each_input_channel(trained_run, tmp_path):
    """alpha=1 moves each FFN input channel's whole range into the weights: on the calibration rows
    every channel of the smoothed input peaks at exactly 1, and the fp32 logits do not change."""
    import onnx
    from transformers import AutoTokenizer

    out, _ = trained_run
    fp32, smoothed = out / "onnx" / "model.onnx", tmp_path / "smoothed.onnx"
    ffn = dict(onnx_graph.int8_fp32_steps(fp32))["FFN output projections"]
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    rows = [{"text": r["text"]} for r in table(out / "predictions" / "validation.tsv")]
    meta = json.loads((out / "onnx" / "finetune.json").read_text())
    onnx_graph.smooth_inputs(fp32, smoothed, ffn, text_check(tokenizer, meta).batches(rows), alpha=1.0)

    model = onnx.load(str(smoothed))
    nodes = {n.name: n for n in model.graph.node}
    inputs = [nodes[name].input[0] for name in ffn]
    assert all(x.endswith("_smoothed") for x in inputs) and len(set(inputs)) == 2
    peaks = channel_peaks(model, inputs, text_check(tokenizer, meta).batches(rows))
    assert peaks.shape == (2, 37) and np.allclose(peaks, 1.0, atol=1e-5)
    reference = text_check(tokenizer, meta).outputs(export.OnnxBackend(str(out / "onnx")), rows)
    (tmp_path / "s").mkdir()
    shutil.copy(smoothed, tmp_path / "s" / "model.onnx")
    shutil.copy(out / "onnx" / "config.json", tmp_path / "s" / "config.json")
    assert np.abs(text_check(tokenizer, meta).outputs(export.OnnxBackend(str(tmp_path / "s")), rows) - reference).max() < 1e-5
    # Every encoder MatMul at once (Q, K and V share their input, so one scale each): still exact.
    onnx_graph.smooth_inputs(fp32, tmp_path / "s" / "model.onnx", onnx_graph.encoder_matmuls(fp32),
                             text_check(tokenizer, meta).batches(rows), alpha=0.9)  # fmt: skip
    smoothed_all = onnx.load(str(tmp_path / "s" / "model.onnx")).graph.node
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in smoothed_all) == 8
    assert np.abs(text_check(tokenizer, meta).outputs(export.OnnxBackend(str(tmp_path / "s")), rows) - reference).max() < 1e-5

    # alpha=0.5: the inputs are divided by s = sqrt(max|X| / max|W row|), per channel, by hand.
    from onnx import numpy_helper

    onnx_graph.smooth_inputs(fp32, tmp_path / "half.onnx", ffn, text_check(tokenizer, meta).batches(rows), alpha=0.5)
    original = onnx.load(str(fp32))
    raw = [n.input[0] for n in original.graph.node if n.name in ffn]
    weights = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    w_max = [np.abs(weights[n.input[1]]).max(axis=1) for n in original.graph.node if n.name in ffn]
    a_max = channel_peaks(original, raw, text_check(tokenizer, meta).batches(rows))
    half = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "half.onnx")).graph.initializer}
    for x, a, w in zip(raw, a_max, w_max):
        assert np.allclose(half[f"{x}_smoothing"], 1 / np.sqrt(a / w), rtol=1e-4)


def test_smoothing_rescues_int8_from_an_outlier_channel(tmp_path):
    """A MatMul whose input has one channel 100x the others: int8 activations (one scale per token)
    lose the small channels; smoothed first (alpha 0.9), the int8 product is far closer to fp32.
    The graph is at opset 18 (the activations rounded by Div, Round, Add, Cast); at opset 21 one
    blocked QuantizeLinear does it, with the same result."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    channel_scale = np.ones(16, dtype=np.float32)
    channel_scale[3] = 100.0
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "channel_scale"], ["scaled"]),
         helper.make_node("MatMul", ["scaled", "weight"], ["logits"], name="proj")],
        "outlier", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(channel_scale, "channel_scale"), numpy_helper.from_array(weight, "weight")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "fp32.onnx"))
    ids = rng.integers(-20, 21, size=(256, 16))
    batches = [(None, {"input_ids": ids[:128]}), (None, {"input_ids": ids[128:]})]
    onnx_graph.smooth_inputs(tmp_path / "fp32.onnx", tmp_path / "smoothed.onnx", ["proj"], iter(batches), alpha=0.9)

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"input_ids": ids})[0]

    exact = (ids * channel_scale) @ weight
    assert np.abs(run(tmp_path / "smoothed.onnx") - exact).max() < 1e-3 * np.abs(exact).max()  # fp32: unchanged
    errors = {}
    for name in ("fp32", "smoothed"):
        onnx_graph.quantize_int8(tmp_path / f"{name}.onnx", tmp_path / f"{name}_int8.onnx", [])
        errors[name] = np.abs(run(tmp_path / f"{name}_int8.onnx") - exact).mean()
    assert errors["smoothed"] < errors["fp32"] / 1.5  # (8.0 -> 4.3 here)
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "fp32_int8.onnx")).graph.node}
    at_21 = onnx.load(str(tmp_path / "fp32.onnx"))
    at_21.opset_import[0].version = 21
    onnx.save(at_21, str(tmp_path / "fp32_21.onnx"))
    onnx_graph.quantize_int8(tmp_path / "fp32_21.onnx", tmp_path / "fp32_21_int8.onnx", [])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "fp32_21_int8.onnx")).graph.node}
    assert np.allclose(run(tmp_path / "fp32_21_int8.onnx"), run(tmp_path / "fp32_int8.onnx"), atol=1e-4)
    # Both forms scale each row on its own: a row's int8 product alone is what it is in the batch.
    for name in ("fp32_int8", "fp32_21_int8"):
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        alone = np.concatenate([session.run(["logits"], {"input_ids": ids[i : i + 1]})[0] for i in range(8)])
        assert np.array_equal(alone, session.run(["logits"], {"input_ids": ids})[0][:8])


def test_int8_of_a_model_over_2gb_keeps_its_weights_in_external_data(trained_run, tmp_path, monkeypatch):
    """Protobuf cannot write a graph of 2 GiB: past onnx_graph.EXTERNAL_DATA_FROM (here lowered to
    what the tiny model's fp32 graph weighs) the smoothed and int8 graphs keep their weights in a
    .data file, the fp32 graph's weights out of their way through every try."""
    from transformers import AutoTokenizer

    out, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    rows = [{"text": r["text"]} for r in table(out / "predictions" / "validation.tsv")]
    meta = json.loads((out / "onnx" / "finetune.json").read_text())
    reference = text_check(tokenizer, meta).outputs(export.OnnxBackend(str(out / "onnx")), rows)
    shutil.copytree(out / "onnx", tmp_path / "inline")
    export._quantize_and_check(tmp_path / "inline", reference, text_check(tokenizer, meta), rows, "rows")
    assert weight_files(tmp_path / "inline") == (set(), set())  # under the limit: one file

    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_FROM", onnx_graph.onnx_size(out / "onnx" / "model.onnx"))
    shutil.copytree(out / "onnx", tmp_path / "q")
    assert export._quantize_and_check(tmp_path / "q", reference, text_check(tokenizer, meta), rows, "rows")[0] == {"label_agreement": 1.0}
    assert weight_files(tmp_path / "q") == ({"model.onnx.data"}, {"model.onnx.data"})
    assert sorted(p.name for p in (tmp_path / "q").glob("*.onnx*")) == ["model.onnx", "model.onnx.data"]
    _, inputs = reference_logits(out / "model", [r["text"] for r in rows])
    assert np.array_equal(onnx_logits(tmp_path / "q", inputs), onnx_logits(tmp_path / "inline", inputs))

    # Every fallback try reads the fp32 weights intact (the int8 graph's .data never replaces them).
    shutil.copytree(out / "onnx", tmp_path / "r")
    monkeypatch.setattr(export, "INT8_MIN_LABEL_AGREEMENT", 1.01)
    with pytest.raises(ExportError, match=r"tried 100.0% with nothing in fp32; 100.0% with FFN output projections in "
                       r"fp32; 100.0% with FFN output projections, first layer in fp32; 100.0% with FFN output "
                       r"projections, first layer, last layer in fp32"):  # fmt: skip
        export._quantize_and_check(tmp_path / "r", reference, text_check(tokenizer, meta), rows, "rows")


def test_check_input_without_a_header_is_read_with_the_runs_column_names(tmp_path):
    from conftest import sentiment_rows, write_tsv

    rows = sentiment_rows(5, seed=4)
    path = write_tsv(tmp_path / "check.tsv", rows, header=None)
    meta = {"text_column": "sentence", "column_names": ["sentence", "label"],
            "id2label": {"0": "negative", "1": "positive"}}  # fmt: skip
    got, source = text_check(None, meta).rows("run", "run/model", 1000, path)
    assert got == [{"text": text} for text, _ in rows] and source == f"rows of {path}"


def test_failed_fp32_check_keeps_the_earlier_export(trained_run, tmp_path, monkeypatch):
    import shutil

    out, _ = trained_run
    dest = tmp_path / "again"
    shutil.copytree(out / "onnx", dest)  # an earlier export
    before = (dest / "finetune.json").read_text()
    monkeypatch.setattr(export, "EXPORTERS", ("torchscript",))  # the fast exporter: this test is about the check
    monkeypatch.setattr(export, "FP32_MAX_LOGIT_DIFF", -1.0)  # no graph can pass
    with pytest.raises(ExportError, match=r"torchscript exporter's logits differ from PyTorch by up to .*Nothing was"):
        export_onnx(str(out), str(dest), check_rows=8)
    assert (dest / "finetune.json").read_text() == before
    assert not list(tmp_path.glob(".*export-tmp"))


def test_label_agreement_follows_the_decision_rule():
    ref = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.2]])
    assert label_agreement(ref, ref + [[0, 0], [0, 0], [0, -0.3]], "single_label_classification") == 2 / 3
    # The run's threshold decides binary labels: P(positive) 0.55 -> 0.62 flips only at threshold 0.6.
    shifted = ref + [[0, 0], [0, 0], [0, 0.3]]
    assert label_agreement(ref, shifted, "single_label_classification", threshold=0.5) == 1.0
    assert label_agreement(ref, shifted, "single_label_classification", threshold=0.6) == 2 / 3
    assert label_agreement(np.array([[1.0], [3.0]]), np.array([[1.01], [3.5]]), "regression") == 0.5


def tiny_classifier(arch):
    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizer

    from test_transfer import tiny_config

    from conftest import VOCAB

    torch.manual_seed(0)
    config = tiny_config(arch)
    config.id2label, config.label2id = {0: "bad", 1: "good", 2: "meh"}, {"bad": 0, "good": 1, "meh": 2}
    model = AutoModelForSequenceClassification.from_config(config)
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, model_input_names=inputs)
    return model, tokenizer


def test_roberta_folder_without_run_exports_on_builtin_sentences(tmp_path):
    model, tokenizer = tiny_classifier("roberta")
    model.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    report = export_onnx(str(tmp_path / "roberta"), str(tmp_path / "onnx"))
    assert report.check_source.startswith("built-in") and report.check_rows == len(export.BUILTIN_SENTENCES)
    assert_matches_pytorch(tmp_path / "roberta", tmp_path / "onnx", ["the movie was great", "a dull boring plot a"])
    got = predict(str(tmp_path / "onnx"), [{"text": "the movie was great"}], progress=False)
    assert set(got[0]) == {"text", "prediction", "prob_bad", "prob_good", "prob_meh"}


def test_modernbert_falls_back_to_opset_18_of_the_dynamo_exporter(tmp_path):
    """At opset 23 the dynamo exporter gives ModernBERT a RotaryEmbedding node ONNX Runtime rejects;
    the export goes on with the same exporter at opset 18 (not the TorchScript last resort)."""
    model, tokenizer = tiny_classifier("modernbert")
    model.save_pretrained(tmp_path / "modernbert")
    tokenizer.save_pretrained(tmp_path / "modernbert")
    report = export_onnx(str(tmp_path / "modernbert"), str(tmp_path / "onnx"), check_rows=4)
    meta = json.loads((tmp_path / "onnx" / "finetune.json").read_text())["export"]
    assert (report.exporter, meta["exporter"], meta["opset"]) == ("dynamo", "dynamo", 18)
    assert_matches_pytorch(tmp_path / "modernbert", tmp_path / "onnx", ["the movie was great", "a dull boring plot a"])


def test_lora_adapter_is_merged_and_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    from finetune.model import save_model

    from transformers import AutoModelForSequenceClassification

    model, tokenizer = tiny_classifier("bert")
    model.save_pretrained(tmp_path / "base")  # the adapter records its base by path
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    # init_lora_weights=False: non-zero B matrices, so a merge that dropped the adapter would show.
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                  init_lora_weights=False))  # fmt: skip
    save_model(peft_model, tokenizer, tmp_path / "adapter", model.config.id2label, meta={"max_length": 32})
    export_onnx(str(tmp_path / "adapter"), str(tmp_path / "onnx"), check_rows=10)
    assert json.loads((tmp_path / "onnx" / "finetune.json").read_text())["adapter"] is False
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    names = [t.name for t in graph.initializer] + [n.name for n in graph.node]
    assert not [n for n in names if "lora" in n.lower()]  # merged weights, no adapter branches
    assert_matches_pytorch(tmp_path / "adapter", tmp_path / "onnx", ["the movie was great", "a dull boring plot a"])


def test_bad_paths_and_unsupported_models_fail_in_one_paragraph(tiny_bert, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        export.main([f"model={tmp_path / 'missing'}", f"output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("finetune.export: error: model=") and "does not exist" in err and err.count("\n") == 1
    with pytest.raises(ExportError, match=r"is a BertModel checkpoint, not a classifier"):
        export_onnx(tiny_bert, str(tmp_path / "out"))

    # An architecture both exporters reject gets the exporters' reasons and the way out.
    import torch

    model, tokenizer = tiny_classifier("bert")
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird_attention' to ONNX opset version 17 is not supported.")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(ExportError, match=r"no ONNX exporter .* BertForSequenceClassification \(bert\) model: dynamo "
                                          r"\(opset 23\) exporter failed \(RuntimeError: .*aten::weird_attention.*dynamo \(opset 18\) exporter failed .*"
                                          r"torchscript \(opset 23\) exporter failed .*backend=torch"):  # fmt: skip
        export_onnx(str(tmp_path / "bert"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_save_export_without_onnxruntime_fails_before_training(monkeypatch):
    import importlib.util

    from test_config import compose_cfg

    from finetune.cli import compose_checked
    from finetune.config import ConfigError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"save.export=onnx_int8 needs onnxruntime, which is not installed: pip install"):
        compose_checked(compose_cfg("recipe=bert_sst2", "output_dir=/tmp/u", "save.export=onnx_int8"))


def test_export_builds_its_model_on_the_cpu_when_a_gpu_is_present(tmp_path, monkeypatch):
    """The exporters trace with CPU example inputs and the check runs ONNX Runtime on the CPU, so a
    model that followed device=auto onto a GPU would fail both exporters; the model stays on the CPU."""
    import sys

    import torch

    model, tokenizer = tiny_classifier("bert")
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    # finetune's code is told a GPU is present; torch's own exporter internals are not misled.
    real_available = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: sys._getframe(1).f_globals["__name__"].startswith("finetune")
                        or real_available())  # fmt: skip
    real_export, devices = torch.onnx.export, []

    def spy(model, *args, **kwargs):
        devices.append({p.device.type for p in model.parameters()})
        return real_export(model, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    export_onnx(str(tmp_path / "bert"), str(tmp_path / "onnx"), check_rows=4)
    assert devices and all(d == {"cpu"} for d in devices)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
