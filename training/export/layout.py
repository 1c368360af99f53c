"""Rewrites of an exported graph's member layout, chosen for how fast onnxruntime runs them.

The fused graph runs M members as grouped convolutions over `[batch, M * C, H, W]`. One exact
rewrite (same arithmetic per output element, so the same outputs up to float summation order):

`dense_input_convs`: a convolution that reads the input replicated once per member (Unsqueeze,
  Expand to M copies, Reshape to `[batch, M * C, H, W]`, a Conv with group = M) is one dense
  convolution with M * C_out output channels on the un-replicated input: the grouped weight
  `[M * C_out, C, kh, kw]` is already a dense one of that shape. No replicated copy, no reorder,
  and onnxruntime's blocked (NCHWc) kernels instead of its generic grouped path.
"""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["dense_input_convs"]


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
    from onnx import numpy_helper

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
