"""The two graphs of an export, as PyTorch modules that `torch.onnx.export` can write.

The predict graph runs all M members as one computation (the fused layers of `training.models`:
grouped convolutions, batched matmuls) and returns `forde_serve.contract.PREDICT_OUTPUTS`. The
explain graph also returns every member's input gradient, computed inside the graph: the gradient
function is traced with `make_fx` into plain ATen ops, and the backward ops that have no ONNX
translation are replaced by their forward-op equivalents (input gradient only).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from forde_serve.contract import EXPLAIN_OUTPUTS, INPUT, PREDICT_OUTPUTS, TARGET
from training.export.checks import ExportContract, ExportError
from training.models import Ensemble

__all__ = ["trace_explain", "write_explain_graph", "write_predict_graph"]

aten = torch.ops.aten

# A convolution's input gradient is computed as depthwise convolutions plus a sum when each group
# has at most this many input channels (see _convolution_backward).
_FEW_CHANNELS = 4


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _heads(member_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Member logits `[B, M, C]` -> the PREDICT_OUTPUTS, in order (same maths as forde_serve.metrics)."""
    member_probs = member_logits.softmax(-1)
    probs = member_probs.mean(1)
    predictive = _entropy(probs)
    expected = _entropy(member_probs).mean(1)
    disagreement = (member_probs.argmax(-1) != probs.argmax(-1, keepdim=True)).float().mean(1)
    return (
        probs,
        member_logits,
        member_probs,
        predictive,
        expected,
        (predictive - expected).clamp_min(0.0),
        disagreement,
    )


class _PredictGraph(nn.Module):
    def __init__(self, ensemble: Ensemble, temperature: float):
        super().__init__()
        self.ensemble, self.temperature = ensemble, temperature

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: A002 - the graph input's name
        return _heads(self.ensemble(input) / self.temperature)


def _explain(ensemble: Ensemble, x: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """PREDICT_OUTPUTS + each member's gradient of its `target` logit (divided by `temperature`, as
    every output is) w.r.t. the raw input."""
    members = ensemble.members
    x_members = x.unsqueeze(1).expand(-1, members, *x.shape[1:]).contiguous().requires_grad_(True)
    member_logits = ensemble.forward_members(ensemble.normalize(x_members)) / temperature
    outputs = _heads(member_logits)
    chosen = torch.where(target < 0, outputs[0].argmax(-1), target)
    picked = member_logits.gather(2, chosen.view(-1, 1, 1).expand(-1, members, 1)).sum()
    (gradients,) = torch.autograd.grad(picked, x_members)
    return (*outputs, gradients)


# Backward ops without an ONNX translation, written with forward ops (input gradient only).
def _convolution_backward(
    grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask
):
    if transposed:
        raise ExportError("explain graph: transposed convolutions inside a member are not supported")
    kernel = weight.shape[2:]
    if (
        list(stride) == [1, 1]
        and list(dilation) == [1, 1]
        and all(p <= k - 1 for p, k in zip(padding, kernel, strict=True))
    ):
        # Stride 1: the input gradient is a plain convolution with each group's kernel flipped and
        # its in/out channels swapped; onnxruntime runs Conv several times faster than ConvTranspose.
        out_channels, in_per_group = weight.shape[:2]
        pad = [k - 1 - p for p, k in zip(padding, kernel, strict=True)]
        if in_per_group <= _FEW_CHANNELS:
            # Few input channels per group (a member's first layer: 1 for grayscale, 3 for RGB):
            # onnxruntime's grouped Conv with so few outputs per group takes a slow generic path.
            # As a depthwise Conv (every gradient channel with its own flipped kernel slice) and a
            # sum over each group's output channels it is the same sum, about 3x faster here.
            per_group = out_channels // groups
            depthwise = (
                weight.view(groups, per_group, in_per_group, *kernel)
                .permute(0, 2, 1, 3, 4)
                .flip(3, 4)
                .reshape(groups * in_per_group * per_group, 1, *kernel)
            )
            # Each group's gradient channels repeat once per input channel they feed (with one input
            # channel, as for grayscale, they are already in place: an Expand to the same shape is a copy).
            grad = grad_output
            if in_per_group > 1:
                grad = grad_output.view(grad_output.shape[0], groups, 1, per_group, *grad_output.shape[2:])
                grad = grad.expand(-1, -1, in_per_group, -1, -1, -1).reshape(
                    grad_output.shape[0], groups * in_per_group * per_group, *grad_output.shape[2:]
                )
            partial = aten.convolution(grad, depthwise, None, [1, 1], pad, [1, 1], False, [0, 0], grad.shape[1])
            grad_input = partial.view(partial.shape[0], groups * in_per_group, per_group, *partial.shape[2:]).sum(2)
            return grad_input, None, None
        flipped = (
            weight.view(groups, out_channels // groups, in_per_group, *kernel)
            .transpose(1, 2)
            .flip(3, 4)
            .reshape(groups * in_per_group, out_channels // groups, *kernel)
        )
        grad_input = aten.convolution(grad_output, flipped, None, [1, 1], pad, [1, 1], False, [0, 0], groups)
        return grad_input, None, None
    # Strided: a transposed convolution is the input gradient of a convolution; output_padding
    # restores the rows/columns that the strided convolution dropped.
    restore = [
        input.shape[2 + d]
        - ((grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (weight.shape[2 + d] - 1) + 1)
        for d in range(2)
    ]
    grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, restore, groups)
    return grad_input, None, None


def _max_pool2d_backward(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    kernel = [kernel_size[0]] * 2 if len(kernel_size) == 1 else list(kernel_size)
    stride = kernel if not stride else ([stride[0]] * 2 if len(stride) == 1 else list(stride))
    batch, channels, height, width = input.shape
    tiles = (
        kernel == stride
        and kernel[0] == kernel[1]
        and not any(padding)
        and all(d == 1 for d in dilation)
        and height % kernel[0] == 0
        and width % kernel[1] == 0
    )
    if tiles:
        # Non-overlapping square windows (MaxPool2d(k) with stride k): one op, which the export writes
        # as onnxruntime's own MaxPool with indices and MaxUnpool (see _max_pool2d_input_grad).
        return torch.ops.forde.max_pool2d_input_grad(grad_output, input, kernel[0])
    return _scatter_to_maxima(grad_output, input, indices)


@torch.library.custom_op("forde::max_pool2d_input_grad", mutates_args=())
def _max_pool2d_input_grad(grad_output: torch.Tensor, input: torch.Tensor, kernel: int) -> torch.Tensor:
    """Input gradient of MaxPool2d(kernel) (stride = kernel, no padding, windows tiling the input):
    each pooled gradient goes to the first maximum of its window in row-major order, as PyTorch routes it.

    Exported as ONNX MaxPool (its Indices output) + MaxUnpool (`_max_pool2d_input_grad_onnx`): onnxruntime's
    MaxPool scans each window in row-major order and keeps the first strict maximum, so both pick the same
    element, ties included. Measured against the strided-slice routing this replaces (four comparisons at
    the pooled size, then DepthToSpace), on [64, 128, 8, 8]: 2.8 against 4.7 ms, and 10.2 against 26.9 ms
    at batch 256 (a one-off onnxruntime micro-benchmark). MaxUnpool writes (does not add), which is exact
    only because tiling windows never share an element; overlapping pools take `_scatter_to_maxima`."""
    window = [kernel, kernel]
    indices = aten.max_pool2d_with_indices(input, window, window)[1]
    return aten.max_pool2d_with_indices_backward(grad_output, input, window, window, [0, 0], [1, 1], False, indices)


@_max_pool2d_input_grad.register_fake
def _(grad_output: torch.Tensor, input: torch.Tensor, kernel: int) -> torch.Tensor:
    return torch.empty_like(input)


def _max_pool2d_input_grad_onnx(grad_output, input, kernel: int):
    from onnxscript import opset18 as op

    window = [kernel, kernel]
    _, indices = op.MaxPool(input, kernel_shape=window, strides=window)
    return op.MaxUnpool(grad_output, indices, op.Shape(input), kernel_shape=window, strides=window)


# The ONNX form of this module's own ops, for torch.onnx.export
ONNX_TRANSLATIONS = {torch.ops.forde.max_pool2d_input_grad.default: _max_pool2d_input_grad_onnx}


def _scatter_to_maxima(grad_output, input, indices):
    # Every pooled gradient goes back to the position its maximum came from.
    batch, channels, height, width = input.shape
    grad_input = grad_output.new_zeros(batch, channels, height * width)
    return grad_input.scatter_add(2, indices.flatten(2), grad_output.flatten(2)).view(batch, channels, height, width)


def _threshold_backward(grad_output, self, threshold):
    # ReLU's backward. The stock decomposition is a Where against a broadcast zero, which
    # onnxruntime runs about 4x slower than this multiply by the 0/1 mask.
    return grad_output * (self > threshold).to(grad_output.dtype)


def _adaptive_max_pool2d_backward(grad_output, input, indices):
    # Like max pooling: every pooled gradient goes back to where its maximum came from.
    return _scatter_to_maxima(grad_output, input, indices)


def _pooling_matrix(windows: list[tuple[int, int, float]], size: int, like: torch.Tensor) -> torch.Tensor:
    """`[outputs, size]`: row o spreads 1 / divisor over window o's input positions [start, end)."""
    rows = [[1.0 / divisor if start <= i < end else 0.0 for i in range(size)] for start, end, divisor in windows]
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _separable_pool_backward(grad_output, input, windows_h, windows_w):
    # Average pooling is A_h x A_w^T per channel (each window's divisor is a product of one count per
    # axis), so its input gradient is A_h^T g A_w: two plain matmuls, exact for any window layout.
    height, width = int(input.shape[2]), int(input.shape[3])
    rows_h = _pooling_matrix(windows_h, height, grad_output)  # [out_h, H]
    rows_w = _pooling_matrix(windows_w, width, grad_output)  # [out_w, W]
    return torch.matmul(torch.matmul(rows_h.t(), grad_output), rows_w)


class _ContiguousPoolInputs(torch.overrides.TorchFunctionMode):
    """Adaptive average pooling of a contiguous copy of its input, while the explain graph is traced.

    ATen's adaptive_avg_pool2d (a composite, so above autograd and out of the decomposition table's
    reach) pools to 1x1 with a mean followed by an in-place as_strided_ that keeps a channels-last
    input's strides (ConvNeXt's permuted blocks make one); that view's backward becomes
    as_strided_scatter, which has no ONNX translation. A contiguous input takes no such step.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


def _adaptive_avg_pool2d_backward(grad_output, input):
    def windows(size: int, outputs: int) -> list[tuple[int, int, float]]:
        spans = [((o * size) // outputs, -(-((o + 1) * size) // outputs)) for o in range(outputs)]
        return [(start, end, float(end - start)) for start, end in spans]

    return _separable_pool_backward(
        grad_output,
        input,
        windows(int(input.shape[2]), int(grad_output.shape[2])),
        windows(int(input.shape[3]), int(grad_output.shape[3])),
    )


def _avg_pool2d_backward(
    grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    kernel = list(kernel_size) * (2 // len(kernel_size))
    stride = list(stride or kernel) * (2 // len(stride or kernel))
    padding = list(padding) * (2 // len(padding))

    def windows(axis: int) -> list[tuple[int, int, float]]:
        # As PyTorch's kernel: the window may reach into the padding (counted with count_include_pad)
        # but not past it; divisor_override replaces the whole count (so one axis carries it).
        size, spans = int(input.shape[2 + axis]), []
        for o in range(int(grad_output.shape[2 + axis])):
            start = o * stride[axis] - padding[axis]
            end = min(start + kernel[axis], size + padding[axis])
            padded = end - start
            start, end = max(start, 0), min(end, size)
            if divisor_override:
                divisor = float(divisor_override) if axis == 0 else 1.0
            else:
                divisor = float(padded if count_include_pad else end - start)
            spans.append((start, end, divisor))
        return spans

    return _separable_pool_backward(grad_output, input, windows(0), windows(1))


def trace_explain(ensemble: Ensemble, example: torch.Tensor, temperature: float = 1.0) -> torch.fx.GraphModule:
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    table[aten.adaptive_max_pool2d_backward.default] = _adaptive_max_pool2d_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    target = torch.full((len(example),), -1, dtype=torch.int64)
    # torch.export refuses autograd inside forward; make_fx unrolls the backward into ATen ops,
    # symbolically so that the batch axis stays free.
    with _ContiguousPoolInputs():
        traced = make_fx(
            lambda x, t: _explain(ensemble, x, t, temperature),
            decomposition_table=table,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(example, target)
    leftovers = sorted(
        {str(n.target) for n in traced.graph.nodes if n.op == "call_function" and "backward" in str(n.target)}
    )
    if leftovers:
        raise ExportError(
            f"explain graph: no ONNX equivalent for {', '.join(leftovers)}; "
            "add a forward-op decomposition in training/export/graphs.py"
        )
    return traced


class _ExplainGraph(nn.Module):
    def __init__(self, traced: torch.fx.GraphModule):
        super().__init__()
        self.traced = traced

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: A002
        return self.traced(input, target)


def _write_onnx(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: tuple[str, ...],
    contract: ExportContract,
    metadata: dict[str, str],
    members: int,
) -> None:
    import onnx

    from training.export.layout import dense_input_convs, mask_before_unpool, upsample_expands_by_matmul

    batch = torch.export.Dim(contract.batch_axis, min=1)
    dynamic = {name: {0: batch} for name in input_names}
    with warnings.catch_warnings():
        # input and target share the one batch axis on purpose; torch warns that it names it once.
        warnings.filterwarnings("ignore", message=r".*The axis name")
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            input_names=input_names,
            output_names=list(output_names),
            dynamic_shapes=dynamic,
            opset_version=contract.opset,
            custom_translation_table=ONNX_TRANSLATIONS,
            verbose=False,
        )
    model = program.model_proto
    # The first convolution reads the input once, not once per member (exact; see layout.py).
    dense_input_convs(model, members)
    upsample_expands_by_matmul(model)
    mask_before_unpool(model)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def write_predict_graph(
    ensemble: Ensemble,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    contract: ExportContract | None = None,
    temperature: float = 1.0,
) -> None:
    """Write only the predict graph of `ensemble` (no validation); `metadata` are metadata_props; the
    member logits are divided by `temperature` before everything else."""
    contract = contract or ExportContract()
    example = torch.zeros(2, *ensemble.input_shape)
    graph = _PredictGraph(ensemble.eval(), temperature)
    _write_onnx(graph, (example,), Path(path), [INPUT], PREDICT_OUTPUTS, contract, metadata or {}, ensemble.members)


def write_explain_graph(
    ensemble: Ensemble,
    example: torch.Tensor,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    contract: ExportContract | None = None,
    temperature: float = 1.0,
) -> None:
    """Trace the explain function on `example` inputs (any batch; the axis stays symbolic) and write it."""
    contract = contract or ExportContract()
    traced = trace_explain(ensemble, example, temperature)
    target = torch.full((len(example),), -1, dtype=torch.int64)
    _write_onnx(
        _ExplainGraph(traced),
        (example, target),
        Path(path),
        [INPUT, TARGET],
        EXPLAIN_OUTPUTS,
        contract,
        metadata or {},
        ensemble.members,
    )
