"""Graph rewrites of an exported encoder (onnx protobufs in, files out), used by finetune.export:
the attention layout, SmoothQuant smoothing, and int8 quantization (per token, batch-invariant) with
the parts to keep in fp32. Each is exact in fp32 or judged by the export's check against PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

# Parts of the encoder kept in fp32, tried in this order until the int8 model passes the label check.
INT8_FP32_STEPS = ("FFN output projections", "first layer", "last layer")
# Graphs made from an fp32 graph of this many bytes (with its weights) or more keep their weights
# in a .data file beside them: protobuf refuses to write a file of 2 GiB, and the smoothed graph
# is a little larger than the one it was made from.
EXTERNAL_DATA_FROM = 2**31 // 16 * 15


def attention_3d(path: Path, num_heads: int, head_dim: int) -> int:
    """Rewrite ``path`` in place so that each ONNX Attention node (opset 23) takes its query, key
    and value as [batch, sequence, heads * head_dim] and returns that shape, with ``q_num_heads`` /
    ``kv_num_heads`` set: the exporter's Reshape to [batch, sequence, -1, head_dim] + Transpose
    before it, and Transpose + Reshape back after it, are what the operator does itself in that
    form (four copies of every activation per layer, ~5% of a 3-layer MiniLM's time). Only nodes
    whose surroundings are exactly that pattern are changed; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer
                 if i.data_location != onnx.TensorProto.EXTERNAL and i.ByteSize() < 1024}  # fmt: skip
    producer = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def swaps_heads(node) -> bool:  # Transpose [0, 2, 1, 3]
        if node is None or node.op_type != "Transpose":
            return False
        return [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 2, 1, 3]]

    def shape_ends(reshape, tail: List[int], lead: List[str]) -> bool:  # target shape Concat(*lead, *tail)
        concat = producer.get(reshape.input[1])
        if reshape.op_type != "Reshape" or concat is None or concat.op_type != "Concat" or len(concat.input) != 2 + len(tail):
            return False
        if list(concat.input[:2]) != lead:  # the same batch and sequence sizes everywhere
            return False
        ends = [constants.get(x) for x in concat.input[2:]]
        return all(e is not None and e.size == 1 and int(e.item()) in allowed for e, allowed in zip(ends, tail))

    removed, rewritten = set(), 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        before = [producer.get(x) for x in node.input[:3]]
        if not all(swaps_heads(t) and len(consumers[t.output[0]]) == 1 for t in before):
            continue
        reshapes = [producer.get(t.input[0]) for t in before]
        if any(r is None or r.op_type != "Reshape" or r.input[1] not in producer for r in reshapes):
            continue
        lead = list(producer[reshapes[0].input[1]].input[:2])
        if not all(shape_ends(r, [(-1, num_heads), (head_dim,)], lead) for r in reshapes):
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or not swaps_heads(after[0]) or len(consumers.get(after[0].output[0], [])) != 1:
            continue
        back = consumers[after[0].output[0]][0]
        if not shape_ends(back, [(-1, num_heads * head_dim)], lead):
            continue
        for i, (t, r) in enumerate(zip(before, reshapes)):
            node.input[i] = r.input[0]
            removed.add(t.output[0])
            if len(consumers[r.output[0]]) == 1:
                removed.add(r.output[0])
        node.output[0] = back.output[0]
        removed |= {after[0].output[0], back.output[0]}
        node.attribute.extend([helper.make_attribute("q_num_heads", num_heads),
                               helper.make_attribute("kv_num_heads", num_heads)])  # fmt: skip
        rewritten += 1
    if rewritten:
        # (removed: the outputs of the Transposes and Reshapes dropped; an Attention node now writes
        # what its trailing Reshape wrote)
        kept = [n for n in graph.node if n.op_type == "Attention" or not n.output or n.output[0] not in removed]
        del graph.node[:]
        graph.node.extend(kept)
        onnx.save(model, str(path))
    return rewritten


def smooth_inputs(fp32: Path, output: Path, matmuls: List[str], batches, alpha: float,
                  external_data: bool = False) -> None:  # fmt: skip
    """Write ``fp32`` to ``output`` with the inputs of the weight MatMuls ``matmuls`` smoothed
    (SmoothQuant, Xiao et al. 2023): per input channel k, s_k = max|X_k|^alpha / max|W_k,:|^(1 - alpha)
    over the calibration ``batches``; X is divided by s (one Mul) and W's rows multiplied by it, so
    the product is unchanged while the activation's outlier channels shrink before each token's
    int8 scale is taken. MatMuls sharing an input share one s. With ``external_data`` the weights
    of ``output`` go to a .data file beside it (``save_graph``)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    groups: Dict[str, list] = {}
    for node in graph.node:
        if node.name in matmuls:
            groups.setdefault(node.input[0], []).append(node)
    if groups:
        # Probed for the statistics by a copy of the graph beside fp32 that reads fp32's own weight
        # files (the weights are not copied, and a graph over 2 GiB is never serialized whole).
        probe = onnx.load(str(fp32), load_external_data=False)
        probe.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in groups)
        probe_file = fp32.with_name(f"{fp32.stem}.probe.onnx")
        onnx.save(probe, str(probe_file))
        try:
            session = ort.InferenceSession(str(probe_file), providers=["CPUExecutionProvider"])
        finally:
            probe_file.unlink()
        names = [i.name for i in session.get_inputs()]
        act_max = {x: 0.0 for x in groups}
        for _, batch in batches:
            values = session.run(list(groups), {n: np.asarray(batch[n], dtype=np.int64) for n in names})
            for x, v in zip(groups, values):
                act_max[x] = np.maximum(act_max[x], np.abs(v).reshape(-1, v.shape[-1]).max(axis=0))
    for x, nodes in groups.items():
        matrices = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in matrices], axis=0)
        scale = (np.maximum(act_max[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        for node, w in zip(nodes, matrices):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(w.dtype), node.input[1]))
        graph.initializer.append(numpy_helper.from_array(1 / scale, f"{x}_smoothing"))
        mul = helper.make_node("Mul", [x, f"{x}_smoothing"], [f"{x}_smoothed"], name=f"{x}_smooth")
        for node in nodes:
            node.input[0] = f"{x}_smoothed"
        graph.node.insert(min(list(graph.node).index(n) for n in nodes), mul)
    save_graph(model, output, external_data)


def save_graph(model, path: Path, external_data: bool = False) -> None:
    """Write ``model`` to ``path``, with ``external_data`` its weights in PATH.data beside it (a
    stale one removed first: onnx appends to an existing file)."""
    import onnx

    if not external_data:
        onnx.save(model, str(path))
        return
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)


def quantize_int8(fp32: Path, output: Path, keep_fp32: List[str], external_data: bool = False) -> None:
    """Write ``fp32`` to ``output`` with its encoder's weight MatMuls in int8, each row (token) of the
    model independent of the rows it is batched with: a weight gets one int8 scale per output
    channel; an activation is quantized per token at run time (symmetric, its own max |x| / 127,
    stored as uint8 around 128) by nodes in the graph, its integer product scaled back by the
    token's scale and the weight's (MatMulIntegerToFloat, an ONNX Runtime operator of the
    com.microsoft domain: the int8 graph runs on ONNX Runtime; then a Mul). ONNX Runtime's
    dynamic quantization takes one activation scale for the whole batch, so a row's int8 logits
    depended on its batch-mates and on padding (a served row could differ from the same row in
    finetune.predict); here a row alone or in any batch gives the same logits.

    ``keep_fp32`` nodes, the embedding lookups (Gather) and the head stay fp32: the
    pooler/classifier (Gemm: once per row, nothing to gain), or a classifier per token (the weight
    MatMuls after the encoder's last FFN output projection: a few outputs per token, whose int8
    rounding flipped a tiny NER model's tags). With ``external_data`` the weights of ``output`` go
    to OUTPUT.data beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32))
    graph = model.graph
    targets = set(encoder_matmuls_of(graph)) - set(keep_fp32)
    weights = {i.name: i for i in graph.initializer}
    # (exports are at opset 18-23: ReduceMax takes its axes as an input from 18 on)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    constants = {
        "int8_last_axis": np.array([-1], np.int64),
        "int8_1_over_127": np.array(1 / 127, np.float32),
        "int8_min_scale": np.array(1e-12, np.float32),
        "int8_zero_point": np.array(128, np.uint8),
        "int8_one": np.array(1, np.float32),
        "int8_128": np.array(128, np.float32),
    }
    nodes, quantized, replaced = [], set(), set()
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and node.name in targets else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        x, name, y = node.input[0], node.input[1], node.output[0]
        if name not in replaced:  # one int8 copy of a weight that several MatMuls read
            matrix = numpy_helper.to_array(w).astype(np.float32)
            scale = (np.maximum(np.abs(matrix).max(axis=0), 1e-12) / 127).astype(np.float32)
            graph.initializer.extend([
                numpy_helper.from_array(np.clip(np.round(matrix / scale), -127, 127).astype(np.int8), f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
            ])  # fmt: skip
            replaced.add(name)
        if x not in quantized:  # Q, K and V read one input: it is quantized once
            nodes += _quantize_per_token(x, int(w.dims[0]), opset, helper, TensorProto)
            quantized.add(x)
        nodes += [
            helper.make_node("MatMulIntegerToFloat", [f"{x}_uint8", f"{name}_int8", "int8_one", f"{name}_scale",
                             "int8_zero_point", f"{name}_zero_point"], [f"{y}_unscaled"],
                             name=f"{y}_int8", domain="com.microsoft"),
            helper.make_node("Mul", [f"{y}_unscaled", f"{x}_token_scale"], [y], name=f"{y}_token_scaled"),
        ]  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = _names_read(graph)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    # the fp32 copies of the quantized weights go, unless something else still reads them
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    save_graph(model, output, external_data)


def _names_read(graph) -> set:
    """The tensor names that ``graph``'s nodes (those of their subgraphs too) read, and its outputs."""
    from onnx import AttributeProto

    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                names |= _names_read(sub)
    return names


def _quantize_per_token(x: str, width: int, opset: int, helper, TensorProto) -> list:
    """Nodes that write X_uint8 (x / X_token_scale rounded, + 128) and X_token_scale
    (max |x| / 127 over the last axis, at least 1e-12). From opset 21 one blocked QuantizeLinear
    (a block the row's width) does the rounding; before it Div, Round, Add and Cast do."""
    nodes = [
        helper.make_node("Abs", [x], [f"{x}_abs"], name=f"{x}_abs"),
        helper.make_node("ReduceMax", [f"{x}_abs", "int8_last_axis"], [f"{x}_abs_max"], name=f"{x}_abs_max", keepdims=1),
        helper.make_node("Mul", [f"{x}_abs_max", "int8_1_over_127"], [f"{x}_raw_scale"], name=f"{x}_raw_scale"),
        helper.make_node("Max", [f"{x}_raw_scale", "int8_min_scale"], [f"{x}_token_scale"], name=f"{x}_token_scale"),
    ]  # fmt: skip
    if opset >= 21:  # the zero point must have the scale's shape: the scale clipped to [128, 128], as uint8
        return nodes + [
            helper.make_node("Clip", [f"{x}_token_scale", "int8_128", "int8_128"], [f"{x}_128"], name=f"{x}_128"),
            helper.make_node("Cast", [f"{x}_128"], [f"{x}_zero_point"], name=f"{x}_zero_point", to=TensorProto.UINT8),
            helper.make_node("QuantizeLinear", [x, f"{x}_token_scale", f"{x}_zero_point"], [f"{x}_uint8"],
                             name=f"{x}_uint8", axis=-1, block_size=width),
        ]  # fmt: skip
    return nodes + [
        helper.make_node("Div", [x, f"{x}_token_scale"], [f"{x}_scaled"], name=f"{x}_scaled"),
        helper.make_node("Round", [f"{x}_scaled"], [f"{x}_rounded"], name=f"{x}_rounded"),
        helper.make_node("Add", [f"{x}_rounded", "int8_128"], [f"{x}_shifted"], name=f"{x}_shifted"),
        helper.make_node("Cast", [f"{x}_shifted"], [f"{x}_uint8"], name=f"{x}_uint8", to=TensorProto.UINT8),
    ]  # fmt: skip


ACTIVATIONS = ("Erf", "Gelu", "FastGelu", "Relu", "Tanh", "Sigmoid")


def int8_fp32_steps(fp32: Path) -> List[tuple[str, List[str]]]:
    """INT8_FP32_STEPS with their MatMul node names. An FFN output projection is a weight MatMul
    that reads the activation function's output (through at most 3 elementwise nodes, as in the
    exported erf GELU); it ends its layer, so the weight MatMuls up to it form one layer."""
    import onnx

    matmuls, ffn_out = _weight_matmuls(onnx.load(str(fp32), load_external_data=False).graph)
    ends = [i + 1 for i, n in enumerate(matmuls) if n.name in ffn_out] or [len(matmuls)]
    layers = [[n.name for n in matmuls[start:end]] for start, end in zip([0] + ends, ends)]
    parts = {"FFN output projections": ffn_out, "first layer": layers[0], "last layer": layers[-1]}
    return [(name, parts[name]) for name in INT8_FP32_STEPS]


def encoder_matmuls(fp32: Path) -> List[str]:
    """The encoder's weight MatMuls: those up to the last FFN output projection (the head's, after
    it, stay fp32 anyway; a graph without FFN output projections found: all weight MatMuls)."""
    import onnx

    return encoder_matmuls_of(onnx.load(str(fp32), load_external_data=False).graph)


def encoder_matmuls_of(graph) -> List[str]:
    """encoder_matmuls of a loaded graph."""
    matmuls, ffn_out = _weight_matmuls(graph)
    end = max((i + 1 for i, n in enumerate(matmuls) if n.name in ffn_out), default=len(matmuls))
    return [n.name for n in matmuls[:end]]


def _weight_matmuls(graph) -> tuple[list, List[str]]:
    """(the MatMul nodes with a constant weight, in graph order; the names of those that are FFN
    output projections)."""
    producer = {out: node for node in graph.node for out in node.output}
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]

    def reads_activation(node) -> bool:
        frontier = [node.input[0]]
        for _ in range(4):
            parents = [producer[x] for x in frontier if x in producer]
            if any(p.op_type in ACTIVATIONS for p in parents):
                return True
            frontier = [x for p in parents for x in p.input]
        return False

    return matmuls, [n.name for n in matmuls if reads_activation(n)]


def drop_unreferenced_data(model_file: Path) -> None:
    """Delete the ``*.data`` files beside ``model_file`` that it does not read its weights from
    (left by the graph it was made from)."""
    import onnx

    used = external_locations(onnx.load(str(model_file), load_external_data=False))
    for data in Path(model_file).parent.glob("*.data"):
        if data.name not in used:
            data.unlink()


def external_locations(model) -> set:
    """The files (beside the graph) that ``model``'s weights are read from."""
    import onnx

    return {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}  # fmt: skip


def onnx_size(model_file: Path) -> int:
    """Bytes of the graph file and of the weight files it reads."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    files = [model_file] + [model_file.parent / name for name in external_locations(model)]
    return sum(f.stat().st_size for f in files)


def needs_external_data(model_file: Path) -> bool:
    """Whether graphs made from ``model_file`` keep their weights beside them (EXTERNAL_DATA_FROM)."""
    return onnx_size(model_file) >= EXTERNAL_DATA_FROM


def move_graph(src: Path, dst: Path) -> None:
    """Rename the graph ``src`` to ``dst``, its external weights to DST.data (DST.<i>.data for
    several files): SRC.data is the name a graph later written to ``src`` gives its own weights."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = sorted(external_locations(model))
    names = {loc: f"{dst.name}.data" if len(locations) == 1 else f"{dst.name}.{i}.data" for i, loc in enumerate(locations)}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = names[entry.value]
    for old, new in names.items():
        (src.parent / old).rename(dst.parent / new)
    onnx.save(model, str(dst))
    if dst != src:
        src.unlink()
