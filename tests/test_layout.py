"""The exporter's member-layout rewrite: the first convolution reads the input once, with the same outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.export import layout
from training.export.graphs import write_explain_graph, write_predict_graph
from training.models import build_ensemble


def _ensemble(channels: int):
    torch.manual_seed(0)
    shape = (channels, 8, 8)
    return build_ensemble("cnn", 3, shape, 5, [0.5] * channels, [0.25] * channels, width=4).eval(), shape


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _groups(path):
    return [
        {a.name: a.i for a in node.attribute}.get("group", 1)
        for node in onnx.load(str(path)).graph.node
        if node.op_type == "Conv"
    ]


@pytest.mark.slow  # exports graphs
@pytest.mark.parametrize("channels", [1, 3])
def test_dense_first_convolution_gives_the_grouped_outputs(channels, tmp_path, monkeypatch):
    ensemble, shape = _ensemble(channels)
    example = torch.rand(2, *shape)
    write_predict_graph(ensemble, tmp_path / "dense.onnx")
    write_explain_graph(ensemble, example, tmp_path / "dense.explain.onnx")
    monkeypatch.setattr(layout, "dense_input_convs", lambda model, members: 0)
    write_predict_graph(ensemble, tmp_path / "grouped.onnx")
    write_explain_graph(ensemble, example, tmp_path / "grouped.explain.onnx")

    # predict: the member-replicated input and its grouped Conv are gone; the first Conv is dense
    # with every member's output channels; explain: its forward's first Conv too.
    assert _groups(tmp_path / "grouped.onnx")[0] == 3 and _groups(tmp_path / "dense.onnx")[0] == 1
    assert not any(n.op_type == "Expand" for n in onnx.load(str(tmp_path / "dense.onnx")).graph.node)
    assert _groups(tmp_path / "dense.explain.onnx").count(1) == 1
    assert _groups(tmp_path / "grouped.explain.onnx").count(1) == 0

    rng = np.random.default_rng(0)
    for batch in (1, 5, 64):  # the batch axis stays symbolic
        x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
        with torch.no_grad():
            want = ensemble(torch.from_numpy(x)).softmax(-1).mean(1).numpy()
        dense, grouped = _run(tmp_path / "dense.onnx", {"input": x}), _run(tmp_path / "grouped.onnx", {"input": x})
        for got, ref in zip(dense, grouped, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dense[0], want, rtol=1e-5, atol=1e-6)
        feeds = {"input": x, "target": np.full(batch, -1, np.int64)}
        dense = _run(tmp_path / "dense.explain.onnx", feeds)
        grouped = _run(tmp_path / "grouped.explain.onnx", feeds)
        for got, ref in zip(dense, grouped, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_a_member_that_mixes_copies_is_left_alone():
    # A constant over the member axis (rank 4 against [B, M, C, H, W]) would differ per copy: no rewrite.
    from onnx import TensorProto, helper, numpy_helper

    members, channels = 2, 1
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axes"], ["u"]),
        helper.make_node("Expand", ["u", "target"], ["e"]),
        helper.make_node("Mul", ["e", "scale"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["output"], group=members, pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, members, 1, 4, 4], np.int64), "target"),
        numpy_helper.from_array(np.arange(members, dtype=np.float32).reshape(members, 1, 1, 1) + 1, "scale"),
        numpy_helper.from_array(np.array([-1, members * channels, 4, 4], np.int64), "shape"),
        numpy_helper.from_array(np.ones((members * 2, channels, 3, 3), np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert layout.dense_input_convs(model, members) == 0
    inits[2] = numpy_helper.from_array(np.full((1, 1, 1), 2.0, np.float32), "scale")  # the same for every copy
    model.graph.initializer[2].CopyFrom(inits[2])
    assert layout.dense_input_convs(model, members) == 1
    assert [n.op_type for n in model.graph.node] == ["Mul", "Conv"]


@pytest.mark.slow  # exports graphs
@pytest.mark.parametrize("kernel", [2, 3])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_in_onnx(kernel, tmp_path):
    # The explain graph's max-pool backward as exported (onnxruntime's MaxPool indices + MaxUnpool)
    # against PyTorch's autograd, on rounded ReLU outputs: many ties (whole windows of zeros, repeated
    # values), where PyTorch routes the gradient to the first maximum in row-major order.
    from training.export.graphs import ONNX_TRANSLATIONS, _max_pool2d_backward

    class Backward(torch.nn.Module):
        def forward(self, grad_output, x):
            return _max_pool2d_backward(grad_output, x, [kernel], [kernel], [0], [1], False, None)

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6 * kernel, 4 * kernel).round().clamp_min(0).requires_grad_(True)
    out = torch.nn.functional.max_pool2d(x, kernel)
    grad_output = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, grad_output)
    program = torch.onnx.export(
        Backward().eval(), (grad_output, x.detach()), dynamo=True, custom_translation_table=ONNX_TRANSLATIONS
    )
    program.save(str(tmp_path / "backward.onnx"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "backward.onnx")).graph.node].count("MaxUnpool") == 1
    (got,) = _run(tmp_path / "backward.onnx", {"grad_output": grad_output.numpy(), "x": x.detach().numpy()})
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.slow  # exports graphs
def test_explain_rewrites_give_the_same_gradients_and_route_ties_like_pytorch(tmp_path, monkeypatch):
    # The explain graph's global-average-pool backward (Expand -> MatMul with ones) and its max-pool
    # backward (MaxPool indices + MaxUnpool, the ReLU mask moved before it) against the graph without the
    # two rewrites, and against PyTorch's autograd on inputs full of ties: a blank image gives every
    # window the same bias-valued activations, where both must pick the first maximum.
    ensemble, shape = _ensemble(1)
    example = torch.rand(2, *shape)
    write_explain_graph(ensemble, example, tmp_path / "rewritten.explain.onnx")
    monkeypatch.setattr(layout, "upsample_expands_by_matmul", lambda model: 0)
    monkeypatch.setattr(layout, "mask_before_unpool", lambda model: 0)
    write_explain_graph(ensemble, example, tmp_path / "plain.explain.onnx")

    ops = [n.op_type for n in onnx.load(str(tmp_path / "rewritten.explain.onnx")).graph.node]
    plain = [n.op_type for n in onnx.load(str(tmp_path / "plain.explain.onnx")).graph.node]
    assert "MaxUnpool" in ops and ops.count("Expand") == plain.count("Expand") - 1
    assert ops.count("MatMul") == plain.count("MatMul") + 1
    unpool = ops.index("MaxUnpool")
    assert ops[unpool - 3 : unpool] == ["Greater", "Cast", "Mul"]  # the mask, now at the pooled size

    rng = np.random.default_rng(0)
    for batch in (1, 5, 64):
        x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
        x[0] = 0.0  # blank: ties in every window
        feeds = {"input": x, "target": np.full(batch, -1, np.int64)}
        got = _run(tmp_path / "rewritten.explain.onnx", feeds)
        for a, b in zip(got, _run(tmp_path / "plain.explain.onnx", feeds), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        inputs = torch.from_numpy(x).unsqueeze(1).expand(-1, ensemble.members, *shape).contiguous()
        inputs.requires_grad_(True)
        logits = ensemble.forward_members(ensemble.normalize(inputs))
        chosen = logits.softmax(-1).mean(1).argmax(-1)
        (want,) = torch.autograd.grad(
            logits.gather(2, chosen.view(-1, 1, 1).expand(-1, ensemble.members, 1)).sum(), inputs
        )
        np.testing.assert_allclose(got[-1], want.numpy(), rtol=1e-4, atol=1e-6)


def test_every_expand_of_a_graph_is_rewritten_and_the_graph_stays_valid():
    # Two global-average-pool backwards in one graph (a squeeze-excite network has one per block): each
    # Expand, with the scalar Div after it whose constant is defined later in the graph, becomes a column
    # times a row of ones, and the graph still runs and answers as before.
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(np.array([1, 3, 4, 4], np.int64), "full")]
    for k in (1, 2):
        nodes += [
            helper.make_node("Expand", [f"x{k}", "full"], [f"e{k}"]),
            helper.make_node("Constant", [], [f"n{k}"], value=numpy_helper.from_array(np.array(16.0, np.float32))),
            helper.make_node("Div", [f"e{k}", f"n{k}"], [f"d{k}"]),
            helper.make_node("Mul", [f"d{k}", "mask"], [f"m{k}"]),
        ]
    nodes.append(helper.make_node("Add", ["m1", "m2"], ["output"]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["batch", 3, 1, 1]) for k in (1, 2)]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 3, 4, 4]))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 4, 4])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    assert layout.upsample_expands_by_matmul(model) == 2
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Expand") == 0
    rng = np.random.default_rng(0)
    feeds = {name: rng.normal(size=(5, 3, *s)).astype(np.float32) for name, s in (("x1", (1, 1)), ("x2", (1, 1)))}
    feeds["mask"] = (rng.uniform(size=(5, 3, 4, 4)) > 0.5).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])
