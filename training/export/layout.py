"""Rewrites of an exported graph, chosen for how fast onnxruntime runs them.

The fused graph runs M members as grouped convolutions over `[batch, M * C, H, W]`. Three exact
rewrites (same arithmetic per output element, so the same outputs up to float summation order):

`dense_input_convs`: a convolution that reads the input replicated once per member (Unsqueeze,
  Expand to M copies, Reshape to `[batch, M * C, H, W]`, a Conv with group = M) is one dense
  convolution with M * C_out output channels on the un-replicated input: the grouped weight
  `[M * C_out, C, kh, kw]` is already a dense one of that shape. No replicated copy, no reorder,
  and onnxruntime's blocked (NCHWc) kernels instead of its generic grouped path.

`upsample_expands_by_matmul`: an Expand of trailing singleton axes (`[batch, C, 1, 1]` to
  `[batch, C, H, W]`: the explain graph's global-average-pool backward) is a matrix product of the
  values as a column `[N, 1]` with a row of H * W ones (each output is one value times 1.0: exact),
  and the elementwise ops with a scalar that follow it (the division by H * W) run before it, on the
  column. onnxruntime runs Expand, and any elementwise op on a tensor whose last axes are 1, an element
  at a time: on batch 256 the Expand, division and ReLU mask took 1.34 ms as Div and broadcasting Mul
  (and more as Expand), 0.46 ms as column, MatMul and one same-shape Mul (a one-off micro-benchmark).

`mask_before_unpool`: in the explain graph a max pool's input gradient (MaxUnpool of the pooled
  gradient to each window's first maximum) is then masked by the ReLU before the pool, a comparison
  of the pool's input at full size. The only elements MaxUnpool writes are maxima, whose input value
  is the pooled value, so the mask can be taken on the pooled values and applied before the unpool:
  the comparison, cast and multiply run on a quarter of the elements (2x2 windows).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["dense_input_convs", "mask_before_unpool", "upsample_expands_by_matmul"]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _constant(graph: onnx.GraphProto, name: str):
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


_ELEMENTWISE = {"Sub", "Div", "Mul", "Add"}


def _constant_rank(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto], name: str) -> int | None:
    for init in graph.initializer:
        if init.name == name:
            return len(init.dims)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        value = _attribute(node, "value")
        return None if value is None else len(value.dims)
    return None


def dense_input_convs(model: onnx.ModelProto, members: int) -> int:
    """Rewrite, in place, every grouped Conv (group = `members`) over the member-replicated input into
    a dense Conv on the input itself; returns how many were rewritten.

    The pattern is Unsqueeze(axis 1) -> Expand to `members` copies -> elementwise ops with constants
    that broadcast within one copy (the normalization: Sub mean, Div std) -> Reshape to
    `[batch, members * C, ...]` -> Conv. The elementwise ops are repeated on the un-replicated input;
    the replicated ones stay wherever something else reads them (the explain graph's gradients do not)."""
    graph = model.graph
    producers = _producers(graph)
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for conv in graph.node:
        match = None if conv.op_type != "Conv" else _replicated_input(graph, producers, conv, members)
        if match is None:
            nodes.append(conv)
            continue
        source, elementwise = match
        for op in elementwise:  # in order from the input towards the Conv
            clone = onnx.NodeProto()
            clone.CopyFrom(op)
            clone.name = f"{op.name or op.output[0]}/dense"
            clone.input[0] = source
            del clone.output[:]
            clone.output.append(f"{op.output[0]}/dense")
            del clone.metadata_props[:]
            nodes.append(clone)
            source = clone.output[0]
        conv.input[0] = source
        _set_attribute(conv, "group", 1)
        nodes.append(conv)
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten:
        _drop_dead(graph)
    return rewritten


def _replicated_input(
    graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto], conv: onnx.NodeProto, members: int
) -> tuple[str, list[onnx.NodeProto]] | None:
    """(the un-replicated input, the elementwise ops between) when `conv` is a grouped Conv of one
    group per member over member-major copies of one tensor; None otherwise."""
    if _attribute(conv, "group", 1) != members or members == 1:
        return None
    reshape = producers.get(conv.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    elementwise: list[onnx.NodeProto] = []
    node = producers.get(reshape.input[0])
    while node is not None and node.op_type in _ELEMENTWISE:
        elementwise.append(node)
        node = producers.get(node.input[0])
    expand = node
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = producers.get(expand.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    axes = _constant(graph, unsqueeze.input[1]) if len(unsqueeze.input) > 1 else _attribute(unsqueeze, "axes")
    target = _constant(graph, expand.input[1])
    shape = _constant(graph, reshape.input[1])
    if axes is None or target is None or shape is None or [int(a) for a in list(axes)] != [1]:
        return None
    # [B, C, *S] -> [B, 1, C, *S] -> [B, M, C, *S] -> [B, M * C, *S]: member-major copies of the input.
    if (
        len(target) < 3
        or int(target[1]) != members
        or len(shape) != len(target) - 1
        or int(shape[1]) != members * int(target[2])
        or any(int(t) not in (1, -1) and int(t) != int(s) for t, s in zip(target[3:], shape[2:], strict=True))
    ):
        return None
    for op in elementwise:
        # The constant must broadcast within one member's copy (trailing C, *S axes), never over the member axis.
        rank = _constant_rank(graph, producers, op.input[1]) if len(op.input) == 2 else None
        if rank is None or rank > len(target) - 2:
            return None
    return unsqueeze.input[0], elementwise[::-1]


_BINARY = {"Mul", "Add", "Sub", "Div"}  # elementwise ops of two inputs


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """name -> dims (int, a symbolic name, or None) from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                for d in info.type.tensor_type.shape.dim
            ]
    return shapes


def upsample_expands_by_matmul(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every Expand of a float tensor's trailing singleton axes (`[batch, ..., 1, 1]` to
    `[batch, ..., H, W]`) as a matrix product with a row of ones (see the module doc), running first the
    elementwise ops with a scalar that only read its result; returns how many were rewritten."""
    graph = model.graph
    shapes = _inferred_shapes(model)
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    float_values = {
        info.name
        for info in (*graph.value_info, *graph.input)
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    rewritten = 0
    # By output name: rewriting rebuilds graph.node, whose messages protobuf copies, so node objects held
    # from before a rewrite no longer are the graph's.
    for output in [n.output[0] for n in graph.node if n.op_type == "Expand"]:
        expand = _producers(graph)[output]
        small, full = shapes.get(expand.input[0]), shapes.get(expand.output[0])
        if small is None or full is None or len(small) != len(full) or expand.input[0] not in float_values:
            continue
        rest = full[1:]  # the batch axis may be symbolic; every other axis must be known
        kept = next((i for i in range(len(small)) if small[i] != full[i]), len(small))
        if (
            kept == 0
            or kept == len(small)
            or any(not isinstance(d, int) or d < 1 for d in rest)
            or any(d != 1 for d in small[kept:])
        ):
            continue
        # elementwise ops with a scalar that only read the expanded value run before it, on [N, 1]
        chain, value = [], expand.output[0]
        while value not in outputs:
            users = _consumers(graph, value)
            if len(users) != 1 or users[0].op_type not in _BINARY or users[0].input[0] != value:
                break
            if _constant_rank(graph, producers, users[0].input[1]) != 0:
                break
            chain.append(users[0])
            value = users[0].output[0]
        name = expand.output[0]
        ones = int(math.prod(full[kept:]))
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([-1, 1], np.int64), f"{name}/column"),
                numpy_helper.from_array(np.ones((1, ones), np.float32), f"{name}/ones"),
                numpy_helper.from_array(np.array([-1, *rest], np.int64), f"{name}/shape"),
            ]
        )
        new = [helper.make_node("Reshape", [expand.input[0], f"{name}/column"], [f"{name}/flat"], name=f"{name}/flat")]
        current = f"{name}/flat"
        for op in chain:
            clone = onnx.NodeProto()
            clone.CopyFrom(op)
            clone.input[0], clone.output[0] = current, f"{op.output[0]}/flat"
            clone.name = f"{op.name or op.output[0]}/flat"
            new.append(clone)
            current = clone.output[0]
        new += [
            helper.make_node("MatMul", [current, f"{name}/ones"], [f"{name}/rows"], name=f"{name}/rows"),
            helper.make_node("Reshape", [f"{name}/rows", f"{name}/shape"], [value], name=f"{name}/up"),
        ]
        # at the last replaced op: every input of the new ops (a scalar's Constant too) is defined by then
        anchor, replaced = (chain or [expand])[-1], {id(expand), *(id(op) for op in chain)}
        nodes = []
        for node in graph.node:
            if node is anchor:
                nodes += new
            elif id(node) not in replaced:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        stale = {op.output[0] for op in chain[:-1]} | {expand.output[0]} - {value}
        infos = [info for info in graph.value_info if info.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(infos)
        producers = _producers(graph)
        rewritten += 1
    return rewritten


def mask_before_unpool(model: onnx.ModelProto) -> int:
    """Move, in place, every mask taken on a max pool's input (Mul by Cast(Greater(X, t)) after a MaxUnpool
    with that MaxPool(X)'s indices) before the MaxUnpool, taken on the pooled values (see the module doc);
    returns how many were moved."""
    graph = model.graph
    producers = _producers(graph)
    moved = 0
    for output in [n.output[0] for n in graph.node if n.op_type == "MaxUnpool"]:  # by name: see above
        unpool = producers[output]
        pool = producers.get(unpool.input[1])
        users = _consumers(graph, unpool.output[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2 or not pool.output[0]:
            continue
        if len(users) != 1 or users[0].op_type != "Mul" or unpool.output[0] in (o.name for o in graph.output):
            continue
        multiply = users[0]
        mask = multiply.input[1] if multiply.input[0] == unpool.output[0] else multiply.input[0]
        cast = producers.get(mask)
        greater = producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if greater is None or greater.op_type != "Greater" or greater.input[0] != pool.input[0]:
            continue
        if _constant_rank(graph, producers, greater.input[1]) != 0:
            continue
        name = unpool.output[0]
        pooled_greater = helper.make_node(
            "Greater", [pool.output[0], greater.input[1]], [f"{name}/mask_bool"], name=f"{name}/mask_bool"
        )
        pooled_cast = helper.make_node(
            "Cast", [f"{name}/mask_bool"], [f"{name}/mask"], name=f"{name}/mask", to=_attribute(cast, "to")
        )
        pooled_multiply = helper.make_node(
            "Mul", [unpool.input[0], f"{name}/mask"], [f"{name}/masked"], name=f"{name}/masked"
        )
        # where the mask was applied: the pooled values, the threshold and the unpooled gradient are defined
        unpooled = onnx.NodeProto()
        unpooled.CopyFrom(unpool)
        unpooled.input[0], unpooled.output[0] = f"{name}/masked", multiply.output[0]
        nodes = []
        for node in graph.node:
            if node is multiply:
                nodes += [pooled_greater, pooled_cast, pooled_multiply, unpooled]
            elif node is not unpool:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        producers = _producers(graph)
        moved += 1
    if moved:
        _drop_dead(graph)
    return moved


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes (and initializers) nothing reads any more, back from the graph outputs."""
    live = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
