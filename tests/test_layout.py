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


@pytest.mark.parametrize("kernel", [2, 3])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(kernel):
    from training.export.graphs import _max_pool2d_backward

    torch.manual_seed(0)
    # Rounded ReLU outputs: many ties (whole windows of zeros), where PyTorch picks the first maximum.
    x = torch.randn(3, 4, 6 * kernel // 2 * 2, 6 * kernel // 2 * 2).round().clamp_min(0).requires_grad_(True)
    out = torch.nn.functional.max_pool2d(x, kernel)
    grad_output = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, grad_output)
    got = _max_pool2d_backward(grad_output, x.detach(), [kernel], [kernel], [0], [1], False, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
