"""Lower the precision of an exported predict graph: int8 for onnxruntime's CPU provider, float16 for
its CUDA provider. The explain graph is not lowered (it stays float32; see `lower_predict_graph`).

int8 is onnxruntime's static QDQ quantization (`quantize_static`), calibrated on the validation
split's inputs, after one layout rewrite made for it (`member_branches`). Why, measured on the
digits FoRDE model (benchmarks/bench_quantize.py --candidates, onnxruntime 1.32, a 2-core
AVX512-VNNI CPU, batch 64, three runs on a busy machine; speedups are float32 / int8):

- The fused graph quantized as it is (grouped convolutions, group = members) ran 0.68x to 1.38x at
  1 thread: MLAS's symmetric int8 convolution kernel takes only group 1 (or depthwise), so grouped
  convolutions take its generic im2col path, while float32 ones run the blocked NCHWc kernels.
- Split into one dense convolution per member (the per-member branch layout), every member's
  convolution takes the symmetric kernel (requantization fused in): 1.34x to 2.66x at 1 thread.
  Per-channel ops between them (ReLU, pooling) run per member, and the branches are concatenated
  once, where the members meet. QOperator instead of QDQ on the same layout measured the same
  within the noise; QDQ is the portable form (other execution providers read it).
- At onnxruntime's default threads (2 here) int8 is about float32's speed (1.0x to 1.4x at batch
  64, 0.7x to 0.9x at batch 1): QLinearConv runs a batch one image at a time, parallel only within
  an image, and an 8x8 digit is too small to share. int8 pays per core: best with 1 intra-op thread
  per process (EnsembleRuntime(threads=1)), or on larger images.
- Dynamic quantization (ConvInteger / MatMulInteger, activations quantized at run time): 0.09x to
  0.18x. Not used.
- Convolutions whose input channels are not a multiple of 4 (those reading a 1- or 3-channel raw
  input) stay float32: the symmetric kernel refuses them, and the im2col path took 2x float32's time.
- Matrix products (the classifier heads) and everything after them stay float32: the logits, the
  softmax and the entropies need float resolution (a quantized softmax gives probabilities in steps
  of 1/256), and onnxruntime's QLinearMatMul refuses per-channel weights of a batched matmul.

The temperature is folded in after quantization: the graph is quantized at T = 1, the temperature
and every other validation-split choice is fitted on the quantized graph's own member logits, and
`fold_temperature` then divides `member_logits` by T with one float32 Div placed after the last
quantized op. Nothing quantized sees T, so its calibrated ranges stay valid, and the served
numbers are those the choices were fitted on.

float16 (`onnxruntime.transformers.float16`) converts the members' body; inputs and outputs stay
float32 (`keep_io_types`), and so do the heads (softmax, entropies, vote): float16's smallest
subnormal (6e-8) would make a confident member's p log p a 0 * -inf.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from forde_serve.contract import INPUT
from forde_serve.errors import FordeError
from training.export.checks import ExportContract, OutputCheck

__all__ = [
    "PRECISIONS",
    "LoweredGraph",
    "QuantizeError",
    "check_precision",
    "fold_temperature",
    "lower_ensemble",
    "lower_predict_graph",
    "lowered_contract",
    "member_branches",
]

PRECISIONS = ("float32", "int8", "fp16")
MEMBER_LOGITS = "member_logits"

# Ops that act on every channel alone (no weights), so they run per member branch unchanged.
_PER_CHANNEL = frozenset(
    "Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Tanh Elu Selu Softplus Identity "
    "MaxPool AveragePool GlobalAveragePool GlobalMaxPool".split()
)
# Ops of the members' convolutional body that run in int8 (onnxruntime has QLinear kernels for them).
_INT8_OPS = {"Conv", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Concat"}


class QuantizeError(FordeError, ValueError):
    """A precision option that cannot be used here; the message names the option."""


def check_precision(precision: str, has_validation: bool, option: str = "--quantize") -> None:
    """Raise QuantizeError unless `precision` is one of PRECISIONS and has what it needs."""
    if precision not in PRECISIONS:
        raise QuantizeError(f"{option}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not has_validation:
        raise QuantizeError(
            f"{option} int8: needs validation data to calibrate the int8 ranges on (forde fuse --validation DATA.npz)"
        )


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def member_branches(model: onnx.ModelProto, members: int) -> int:
    """Rewrite, in place, every Conv with one group per member (group = `members`, constant weights)
    into `members` dense Convs, one per member; returns how many were rewritten.

    A tensor of member-major channels `[batch, members * C, ...]` is split once, and stays split
    through the next grouped Convs and the per-channel ops between them (`_PER_CHANNEL`); the parts
    are concatenated (axis 1) only where another op reads the whole tensor. Each output element is
    the same sum as before.
    """
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    parts: dict[str, list[str]] = {}  # tensor -> its per-member parts, member-major
    whole: set[str] = set()  # split tensors that also exist whole (original, or concatenated again)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0

    def split(name: str) -> list[str]:
        if name not in parts:
            outputs = [f"{name}/member{m}" for m in range(members)]
            nodes.append(helper.make_node("Split", [name], outputs, axis=1, num_outputs=members, name=f"{name}/split"))
            parts[name] = outputs
            whole.add(name)
        return parts[name]

    def materialize(name: str) -> None:
        if name in parts and name not in whole:
            nodes.append(helper.make_node("Concat", parts[name], [name], axis=1, name=f"{name}/concat"))
            whole.add(name)

    for node in graph.node:
        grouped = (
            node.op_type == "Conv"
            and members > 1
            and _attribute(node, "group", 1) == members
            and all(name in weights for name in node.input[1:] if name)
        )
        if grouped:
            inputs = split(node.input[0])
            weight = numpy_helper.to_array(weights[node.input[1]])
            bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
            per = weight.shape[0] // members
            base = node.name or node.output[0]
            outputs = []
            for m in range(members):
                names = [inputs[m], f"{base}/member{m}/weight"]
                graph.initializer.append(numpy_helper.from_array(weight[m * per : (m + 1) * per], names[1]))
                if bias is not None:
                    names.append(f"{base}/member{m}/bias")
                    graph.initializer.append(numpy_helper.from_array(bias[m * per : (m + 1) * per], names[2]))
                out = f"{node.output[0]}/member{m}"
                attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
                nodes.append(helper.make_node("Conv", names, [out], name=f"{base}/member{m}", **attributes))
                outputs.append(out)
            parts[node.output[0]] = outputs
            rewritten += 1
            continue
        per_channel = (
            node.op_type in _PER_CHANNEL
            and node.input[0] in parts
            and len([o for o in node.output if o]) == 1
            and not any(name in parts for name in node.input[1:])
        )
        if per_channel:
            outputs = []
            for m, part in enumerate(parts[node.input[0]]):
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"{node.name or node.output[0]}/member{m}"
                copy.input[0] = part
                del copy.output[:]
                copy.output.append(f"{node.output[0]}/member{m}")
                outputs.append(copy.output[0])
                nodes.append(copy)
            parts[node.output[0]] = outputs
            continue
        for name in node.input:
            materialize(name)
        nodes.append(node)
    for output in graph.output:
        materialize(output.name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # stale for the rewritten tensors; shape inference fills it again
    return rewritten


def fold_temperature(model: onnx.ModelProto, temperature: float) -> None:
    """Divide the graph's `member_logits` by `temperature`, in place, with one float32 Div right after
    the op that produces them; everything that read them (softmax, heads, the output) reads the
    divided ones. Refuses a graph in which a QuantizeLinear reads the logits (its range was
    calibrated at T = 1)."""
    if temperature == 1.0:
        return
    graph = model.graph
    raw = f"{MEMBER_LOGITS}/uncalibrated"
    producer = next((n for n in graph.node if MEMBER_LOGITS in n.output), None)
    if producer is None:
        raise ValueError(f"fold_temperature: no node produces {MEMBER_LOGITS!r}")
    if any(n.op_type == "QuantizeLinear" and MEMBER_LOGITS in n.input for n in graph.node):
        raise ValueError(f"fold_temperature: {MEMBER_LOGITS!r} is quantized; quantize only the members' body")
    producer.output[list(producer.output).index(MEMBER_LOGITS)] = raw
    name = f"{MEMBER_LOGITS}/temperature"
    graph.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), name))
    divide = helper.make_node("Div", [raw, name], [MEMBER_LOGITS], name=f"{MEMBER_LOGITS}/divide_by_temperature")
    index = list(graph.node).index(producer)
    graph.node.insert(index + 1, divide)


def _int8_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(nodes to quantize, convolutions kept float32) of the members' convolutional body: every Conv,
    the `_INT8_OPS` between two of them (pooling, residual additions), the activation right after one.
    Nothing after the last convolution (the heads) is quantized. A Conv whose input channels are not a
    multiple of 4 stays float32 (see the module docstring)."""
    graph = model.graph
    for i, node in enumerate(graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    weights = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    after_conv: set[str] = set()  # nodes with a Conv upstream
    for node in graph.node:
        if any(
            (p := producers.get(name)) is not None and (p.op_type == "Conv" or p.name in after_conv)
            for name in node.input
        ):
            after_conv.add(node.name)
    before_conv: set[str] = set()  # nodes with a Conv downstream
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in reversed(graph.node):
        if any(c.op_type == "Conv" or c.name in before_conv for out in node.output for c in consumers.get(out, [])):
            before_conv.add(node.name)
    chosen, kept_float = [], []
    for node in graph.node:
        if node.op_type == "Conv":
            weight = weights.get(node.input[1])
            (kept_float if weight is None or weight.dims[1] % 4 else chosen).append(node.name)
        elif node.op_type in _INT8_OPS and node.name in after_conv and node.name in before_conv:
            chosen.append(node.name)
        elif node.op_type in _PER_CHANNEL and getattr(producers.get(node.input[0]), "name", None) in chosen:
            chosen.append(node.name)  # the activation right after an int8 Conv (fused into it)
    return chosen, kept_float


def _quantize_int8(float_model: onnx.ModelProto, members: int, calibration: np.ndarray, workdir: Path) -> tuple:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration inputs `[N, *input_shape]`, 64 at a time."""

        def __init__(self, x: np.ndarray):
            self.batches = iter([{INPUT: x[i : i + 64]} for i in range(0, len(x), 64)])

        def get_next(self):
            return next(self.batches, None)

    source, prepared = workdir / "float.onnx", workdir / "prepared.onnx"
    onnx.save(float_model, str(source))
    # Shape inference and onnxruntime's basic optimizations, constant folding among them: the grouped
    # weights become plain initializers, which member_branches needs.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    branches = member_branches(model, members)
    chosen, kept_float = _int8_nodes(model)
    onnx.save(model, str(prepared))
    quantized = workdir / "int8.onnx"
    quantize_static(
        str(prepared),
        str(quantized),
        Reader(np.ascontiguousarray(calibration, dtype=np.float32)),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=sorted(_INT8_OPS),
        nodes_to_quantize=chosen,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,  # symmetric (zero point 0): what MLAS's int8 conv kernel needs
    )
    notes = {
        "member_branches": branches,
        "int8_convs": sum(1 for n in model.graph.node if n.op_type == "Conv" and n.name in chosen),
        "float32_convs": len(kept_float),
    }
    return onnx.load(str(quantized)), notes


def _sort_topologically(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"graph: {pending[0].name or pending[0].op_type} reads a tensor nothing produces")
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def _convert_fp16(float_model: onnx.ModelProto) -> tuple:
    """The members' body (input -> member_logits) in float16, float32 at both ends, followed by the
    heads as they were (float32)."""
    from onnx.utils import Extractor
    from onnxruntime.transformers.float16 import convert_float_to_float16

    body = Extractor(float_model).extract_model([INPUT], [MEMBER_LOGITS])
    in_body = {out for node in body.graph.node for out in node.output}
    heads = [node for node in float_model.graph.node if not set(node.output) <= in_body]
    # Converting the whole graph with the heads on a block list would still round-trip every head's
    # output through float16 and turn their float constants (the 1e-12 under the logarithms) into 0.
    body = convert_float_to_float16(body, keep_io_types=True)
    notes = {"float16_nodes": sum(1 for n in body.graph.node if n.op_type != "Cast"), "float32_heads": len(heads)}
    graph = body.graph
    body_names = {i.name for i in graph.initializer}
    read = {name for node in heads for name in node.input}
    renamed = {}
    for init in float_model.graph.initializer:
        if init.name in read:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            if copy.name in body_names:  # a constant the body shares, now float16 there
                renamed[init.name] = copy.name = f"{init.name}/float32"
            graph.initializer.append(copy)
    for node in heads:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            copy.input[i] = renamed.get(name, name)
        graph.node.append(copy)
    del graph.output[:]
    graph.output.extend(float_model.graph.output)
    del graph.value_info[:]
    _sort_topologically(graph)  # the converter appends its input Casts at the end
    model = helper.make_model(graph, opset_imports=float_model.opset_import, ir_version=float_model.ir_version)
    onnx.checker.check_model(model)
    return model, notes


@dataclass
class LoweredGraph:
    """A predict graph at `precision`, still at T = 1, with what was done to it (`notes`)."""

    precision: str
    model: onnx.ModelProto
    notes: dict

    def member_logits(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        """`[N, members, classes]` uncalibrated member logits of raw inputs `x`, onnxruntime on the CPU."""
        import onnxruntime as ort

        session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ascontiguousarray(x, dtype=np.float32)
        runs = [session.run([MEMBER_LOGITS], {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        return np.concatenate(runs).astype(np.float64)

    def write(self, path: str | Path, metadata: dict[str, str], temperature: float) -> None:
        """Write the graph with `temperature` folded in (`fold_temperature`) and `metadata` as metadata_props."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        fold_temperature(model, temperature)
        del model.metadata_props[:]
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(path))


def lower_ensemble(
    ensemble, precision: str, calibration: np.ndarray | None = None, contract: ExportContract | None = None
) -> LoweredGraph:
    """`ensemble`'s predict graph (written at T = 1, as `write_predict_graph` writes it) lowered to
    `precision` (`lower_predict_graph`)."""
    from training.export.graphs import write_predict_graph

    check_precision(precision, calibration is not None)
    with tempfile.TemporaryDirectory(prefix="forde-lower-") as workdir:
        path = Path(workdir) / "float32.onnx"
        write_predict_graph(ensemble, path, {}, contract, temperature=1.0)
        return lower_predict_graph(path, precision, ensemble.members, calibration)


def lower_predict_graph(
    float_path: str | Path, precision: str, members: int, calibration: np.ndarray | None = None
) -> LoweredGraph:
    """The float32 predict graph at `float_path` (written at T = 1) lowered to `precision`.

    int8 calibrates its activation ranges on `calibration` (raw inputs, the validation split's);
    fp16 needs none. The explain graph is not lowered: the gradients it serves stay those of the
    float32 members, which the int8 or float16 predict graph approximates.
    """
    check_precision(precision, calibration is not None)
    model = onnx.load(str(float_path))
    if precision == "int8":
        with tempfile.TemporaryDirectory(prefix="forde-int8-") as workdir:
            lowered, notes = _quantize_int8(model, members, calibration, Path(workdir))
    elif precision == "fp16":
        lowered, notes = _convert_fp16(model)
    else:
        raise QuantizeError(f"--quantize: {precision} is not a lowered precision")
    return LoweredGraph(precision, lowered, notes)


# How closely a lowered predict graph must match the PyTorch ensemble (float32). int8 rounds every
# activation of the members' body to 1 of 256 levels and every weight to 1 of 255; float16 keeps about
# 3 significant digits. Measured on the digits FoRDE run (8 members, T = 0.46, its 540 validation and
# test inputs), worst |difference| int8 / fp16: probs 0.023 / 0.001, member_logits 3.6 / 0.20 (of
# 183), member_probs 0.18 / 0.008 (a member near a tie at T < 1), predictive entropy 0.066 / 0.003,
# expected entropy 0.028 / 0.001, mutual information 0.063 / 0.003, vote_disagreement one member's
# vote / none. The tolerances are about twice those; a member whose top two logits are that close
# may vote the other way, so vote_disagreement may move by 2/M (int8) or 1/M (fp16).
_LOWERED_CHECKS = {
    "int8": {
        "probs": OutputCheck("max_abs", atol=0.05),
        "member_logits": OutputCheck("max_abs", atol=1.0, rtol=0.04),
        "member_probs": OutputCheck("max_abs", atol=0.35),
        "predictive_entropy": OutputCheck("max_abs", atol=0.15),
        "expected_entropy": OutputCheck("max_abs", atol=0.1),
        "mutual_information": OutputCheck("max_abs", atol=0.15),
    },
    "fp16": {
        "probs": OutputCheck("max_abs", atol=5e-3),
        "member_logits": OutputCheck("max_abs", atol=0.1, rtol=5e-3),
        "member_probs": OutputCheck("max_abs", atol=0.03),
        "predictive_entropy": OutputCheck("max_abs", atol=0.01),
        "expected_entropy": OutputCheck("max_abs", atol=0.01),
        "mutual_information": OutputCheck("max_abs", atol=0.01),
    },
}
_FLIPPED_VOTES = {"int8": 2, "fp16": 1}


def lowered_contract(precision: str, members: int, contract: ExportContract | None = None) -> ExportContract:
    """`contract` (default: ExportContract()) with the predict outputs' tolerances of `precision` for an
    ensemble of `members`."""
    contract = contract or ExportContract()
    if precision == "float32":
        return contract
    votes = OutputCheck("max_abs", atol=min(1.0, _FLIPPED_VOTES[precision] / members) + 1e-6)
    return replace(contract, checks=contract.checks | _LOWERED_CHECKS[precision] | {"vote_disagreement": votes})
