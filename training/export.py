"""Fuse a trained ensemble into one batched ONNX graph, plus a twin that explains itself.

`NAME.onnx` runs all M members as one computation (the fused layers of
`training.ensemble`: grouped convolutions, batched matmuls) and returns the outputs of
`forde_serve.contract.PREDICT_OUTPUTS`. `NAME.explain.onnx` also returns every member's
input gradient, computed inside the graph: the gradient function is traced with
`make_fx` into plain ATen ops, and the backward ops that have no ONNX translation are
replaced by their forward-op equivalents (DESIGN.md section 4). After writing, both files
are run in onnxruntime on real validation inputs and compared with the PyTorch ensemble;
a file that does not match is removed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from forde_serve.contract import (
    EXPLAIN_OUTPUTS,
    FORMAT_VERSION,
    INPUT,
    METADATA_KEYS,
    PREDICT_OUTPUTS,
    TARGET,
    explain_path,
)
from forde_serve.metrics import uncertainty
from training.ensemble import Ensemble
from training.forde import member_input_gradients

__all__ = [
    "ExportContract",
    "ExportError",
    "ExportValidationError",
    "abstention_threshold",
    "export_ensemble",
    "export_run",
    "validation_abstention",
    "write_predict_graph",
]

aten = torch.ops.aten


class ExportError(RuntimeError):
    """The ensemble could not be written as the contract asks."""


class ExportValidationError(ExportError):
    """The written files do not compute what the PyTorch ensemble computes; lists every failure."""


@dataclass(frozen=True)
class ExportContract:
    """How the ensemble is exported and how closely the files must match PyTorch."""

    opset: int = 18
    batch_axis: str = "batch"
    # output -> (absolute tolerance, relative tolerance); gradients are compared relative to their
    # largest magnitude, since their scale depends on the model.
    tolerances: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "probs": (1e-4, 0.0),
            "member_logits": (1e-3, 1e-4),
            "member_probs": (1e-4, 0.0),
            "predictive_entropy": (1e-4, 0.0),
            "expected_entropy": (1e-4, 0.0),
            "mutual_information": (1e-4, 0.0),
            "vote_disagreement": (1e-6, 0.0),
            "input_gradients": (0.0, 1e-3),  # relative L2 error of each member's gradient map
        }
    )
    # A ReLU network's gradient jumps where a unit sits at its kink, and float32 rounding decides
    # the side: a few member gradients may differ by a few percent (torch itself does, float32 vs
    # float64). A wrong graph is off on every input, so a small share of such outliers is allowed.
    gradient_outlier_share: float = 0.25
    gradient_outlier_limit: float = 0.05


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
    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: A002 - the graph input's name
        return _heads(self.ensemble(input))


def _explain(ensemble: Ensemble, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PREDICT_OUTPUTS + each member's gradient of its `target` logit w.r.t. the raw input."""
    members = ensemble.members
    x_members = x.unsqueeze(1).expand(-1, members, *x.shape[1:]).contiguous().requires_grad_(True)
    member_logits = ensemble.forward_members(ensemble.normalize(x_members))
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
        flipped = (
            weight.view(groups, out_channels // groups, in_per_group, *kernel)
            .transpose(1, 2)
            .flip(3, 4)
            .reshape(groups * in_per_group, out_channels // groups, *kernel)
        )
        grad_input = aten.convolution(
            grad_output,
            flipped,
            None,
            [1, 1],
            [k - 1 - p for p, k in zip(padding, kernel, strict=True)],
            [1, 1],
            False,
            [0, 0],
            groups,
        )
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
    # Every pooled gradient goes back to the position its maximum came from.
    batch, channels, height, width = input.shape
    grad_input = grad_output.new_zeros(batch, channels, height * width)
    return grad_input.scatter_add(2, indices.flatten(2), grad_output.flatten(2)).view(batch, channels, height, width)


def _trace_explain(ensemble: Ensemble, example: torch.Tensor) -> torch.fx.GraphModule:
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    target = torch.full((len(example),), -1, dtype=torch.int64)
    # torch.export refuses autograd inside forward; make_fx unrolls the backward into ATen ops,
    # symbolically so that the batch axis stays free.
    traced = make_fx(
        lambda x, t: _explain(ensemble, x, t),
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
            "add a forward-op decomposition in training/export.py"
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
) -> None:
    import onnx

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
            verbose=False,
        )
    model = program.model_proto
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def write_predict_graph(
    ensemble: Ensemble,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    contract: ExportContract = ExportContract(),
) -> None:
    """Write only the predict graph of `ensemble` (no validation); `metadata` are metadata_props."""
    example = torch.zeros(2, *ensemble.input_shape)
    _write_onnx(
        _PredictGraph(ensemble.eval()), (example,), Path(path), [INPUT], PREDICT_OUTPUTS, contract, metadata or {}
    )


def validation_abstention(member_probs: np.ndarray, labels: np.ndarray, target_risk: float) -> dict[str, float]:
    """`abstention_threshold` from member probabilities `[N, M, C]` and labels `[N]` of a validation split."""
    correct = member_probs.mean(1).argmax(1) == labels
    return abstention_threshold(uncertainty(member_probs)["mutual_information"], correct, target_risk)


def abstention_threshold(mutual_information: np.ndarray, correct: np.ndarray, target_risk: float) -> dict[str, float]:
    """The largest mutual-information threshold whose accepted inputs (MI <= threshold) have an
    error rate at most `target_risk`; returns threshold, coverage and the achieved risk.

    When no threshold reaches the target, the threshold sits below every input (abstain on all).
    """
    order = np.argsort(mutual_information, kind="stable")
    mi, errors = mutual_information[order], 1.0 - correct[order].astype(np.float64)
    risk = np.cumsum(errors) / np.arange(1, len(mi) + 1)
    # Only cut between distinct MI values: a threshold accepts all inputs with equal MI.
    last_of_value = np.append(mi[1:] != mi[:-1], True)
    ok = np.flatnonzero((risk <= target_risk) & last_of_value)
    if len(ok) == 0:
        return {"threshold": float(np.nextafter(mi[0], -np.inf)), "coverage": 0.0, "risk": 0.0}
    k = ok[-1]
    return {"threshold": float(mi[k]), "coverage": float((k + 1) / len(mi)), "risk": float(risk[k])}


def _reference(ensemble: Ensemble, x: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """What the files must compute, from the PyTorch ensemble (autograd) and forde_serve's numpy maths."""
    with torch.no_grad():
        logits = ensemble(x)
    member_probs = logits.softmax(-1).double().numpy()
    probs = member_probs.mean(1)
    chosen = torch.where(target < 0, torch.from_numpy(probs.argmax(-1)), target)
    _, grads = member_input_gradients(ensemble, ensemble.normalize(x), chosen)
    return {
        "probs": probs,
        "member_logits": logits.double().numpy(),
        "member_probs": member_probs,
        **uncertainty(member_probs),
        "input_gradients": (grads / ensemble.std).double().numpy(),
    }


def _compare_gradients(
    value: np.ndarray, want: np.ndarray, rtol: float, contract: ExportContract
) -> tuple[float, float, bool, str]:
    """Relative L2 error per (input, member) gradient map; see ExportContract on kink outliers."""
    count = value.shape[0] * value.shape[1]
    diff = np.linalg.norm((value - want).reshape(count, -1), axis=1)
    relative = diff / (np.linalg.norm(want.reshape(count, -1), axis=1) + 1e-12)
    outliers = int(np.sum(relative > rtol))
    allowed_outliers = max(1, int(contract.gradient_outlier_share * count))
    passed = outliers <= allowed_outliers and float(relative.max()) <= contract.gradient_outlier_limit
    if outliers == 0:
        return float(relative.max()), rtol, passed, "max rel L2"
    median = float(np.median(relative))
    return (
        median,
        rtol,
        passed and median <= rtol,
        (
            f"{outliers}/{count} maps over {rtol:g} (worst {relative.max():.2e}, at most {allowed_outliers} "
            f"within {contract.gradient_outlier_limit:g} allowed: ReLU kinks); median rel L2"
        ),
    )


def _validate(
    paths: dict[str, Path], ensemble: Ensemble, x: torch.Tensor, target: torch.Tensor, contract: ExportContract, echo
) -> None:
    """Names, then shapes, then values of every output of both files; one error lists all failures."""
    import onnxruntime as ort

    expected = _reference(ensemble, x, target)
    failures, rows = [], []
    for graph, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = PREDICT_OUTPUTS if graph == "predict" else EXPLAIN_OUTPUTS
        got_names = tuple(o.name for o in session.get_outputs())
        if got_names != names:
            failures.append(f"{path.name}: outputs are {got_names}, expected {names}")
            continue
        feed = {INPUT: x.numpy()} | ({TARGET: target.numpy()} if graph == "explain" else {})
        for name, value in zip(names, session.run(None, feed), strict=True):
            want = expected[name]
            if value.shape != want.shape:
                failures.append(f"{path.name}: {name} has shape {list(value.shape)}, expected {list(want.shape)}")
                continue
            atol, rtol = contract.tolerances[name]
            if name == "input_gradients":
                diff, allowed, passed, note = _compare_gradients(value, want, rtol, contract)
            else:
                diff = float(np.max(np.abs(value - want))) if value.size else 0.0
                allowed = atol + rtol * float(np.max(np.abs(want)))
                passed, note = diff <= allowed, "max |diff|"
            rows.append((graph, name, diff, allowed, passed, note))
            if not passed:
                failures.append(f"{path.name}: {name} {note} {diff:.3g} (allowed {allowed:.3g})")
    for graph, name, diff, allowed, passed, note in rows:
        echo(f"  {'✓' if passed else '✗'} {graph:<8} {name:<20} {note} {diff:.2e}  (tolerance {allowed:.2e})")
    if failures:
        raise ExportValidationError("exported files do not match the PyTorch ensemble:\n  " + "\n  ".join(failures))


def export_ensemble(
    ensemble: Ensemble,
    path: str | Path,
    metadata: dict[str, str],
    validation_x: torch.Tensor,
    validation_target: torch.Tensor,
    contract: ExportContract = ExportContract(),
    echo=print,
) -> dict[str, Path]:
    """Write `path` (predict) and its `.explain.onnx` twin, then validate them; returns both paths.

    `metadata` maps METADATA_KEYS names (without the `forde.` prefix) to strings; the format
    version and graph kind are added here. On a failed validation both files are removed.
    The ensemble is switched to eval mode, float32, on the CPU (in place).
    """
    ensemble = ensemble.eval().cpu().float()
    path = Path(path)
    paths = {"predict": path, "explain": Path(explain_path(str(path)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    props = {METADATA_KEYS[k]: v for k, v in metadata.items()} | {METADATA_KEYS["format_version"]: FORMAT_VERSION}
    example = validation_x[:2].float()
    tmp = {graph: p.with_name(f".{p.name}.tmp") for graph, p in paths.items()}
    try:
        write_predict_graph(ensemble, tmp["predict"], props | {METADATA_KEYS["graph"]: "predict"}, contract)
        traced = _trace_explain(ensemble, example)
        _write_onnx(
            _ExplainGraph(traced),
            (example, torch.full((2,), -1, dtype=torch.int64)),
            tmp["explain"],
            [INPUT, TARGET],
            EXPLAIN_OUTPUTS,
            contract,
            props | {METADATA_KEYS["graph"]: "explain"},
        )
        _validate(tmp, ensemble, validation_x.float(), validation_target, contract, echo)
        for graph in paths:
            tmp[graph].replace(paths[graph])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return paths


# How an uploaded picture becomes a raw input: PIL mode, [height, width], multiply 0..255 by
# scale, and invert first (digits are bright ink on black; photographed digits are dark on light).
_IMAGE = {
    "digits": {"mode": "L", "size": [8, 8], "scale": 16 / 255, "invert": True},
    "cifar10": {"mode": "RGB", "size": [32, 32], "scale": 1 / 255, "invert": False},
    "cifar100": {"mode": "RGB", "size": [32, 32], "scale": 1 / 255, "invert": False},
}

_INPUT_SPACE = {
    "digits": "scikit-learn load_digits().images as float32 [1, 8, 8], pixel counts 0 to 16",
    "cifar10": "RGB floats in [0, 1] as float32 [3, 32, 32] (channels first)",
    "cifar100": "RGB floats in [0, 1] as float32 [3, 32, 32] (channels first)",
}


def export_run(
    run_dir: str | Path,
    path: str | Path,
    target_risk: float = 0.01,
    validation_inputs: int = 64,
    contract: ExportContract = ExportContract(),
    echo=print,
) -> dict:
    """Export a finished training run; the abstention threshold is chosen on its validation split."""
    from training.data import load_dataset
    from training.evaluation import member_probabilities
    from training.run import load_run

    run = load_run(run_dir)
    data = load_dataset(run.config.data)
    abstain = validation_abstention(member_probabilities(run.ensemble, data.val.x), data.val.y.numpy(), target_risk)
    forde = run.config.forde
    metadata = {
        "class_names": json.dumps(list(run.dataset.class_names)),
        "input_shape": json.dumps(list(run.dataset.input_shape)),
        "input_space": _INPUT_SPACE[run.dataset.name],
        "image": json.dumps(_IMAGE[run.dataset.name]),
        "members": str(run.ensemble.members),
        "method": run.config.ensemble.method,
        "kernel": json.dumps(
            {
                "lengthscale": forde.lengthscale,
                "alpha": forde.alpha,
                "every": forde.every,
                "batch": forde.batch,
                "strength": forde.strength,
            }
            if run.config.ensemble.method == "forde"
            else None
        ),
        "training_config": run.config.to_json(),
        "metrics": json.dumps(run.metrics),
        "abstain_threshold": repr(abstain["threshold"]),
        "abstain_target_risk": repr(target_risk),
        "abstain_coverage": repr(abstain["coverage"]),
        "abstain_validation_risk": repr(abstain["risk"]),
    }
    count = min(validation_inputs, len(data.val.x))
    x = data.val.x[:count]
    # Half the rows ask for the true class, half for the ensemble's own prediction (-1).
    target = torch.where(torch.arange(count) % 2 == 0, data.val.y[:count], torch.full((count,), -1))
    echo(f"exporting {run_dir} ({run.ensemble.members} members) -> {path}")
    paths = export_ensemble(run.ensemble, path, metadata, x, target, contract, echo)
    sizes = {graph: p.stat().st_size for graph, p in paths.items()}
    echo(
        f"abstain when mutual_information > {abstain['threshold']:.4g}: validation coverage "
        f"{abstain['coverage']:.1%} at error rate {abstain['risk']:.2%} (target {target_risk:.0%})"
    )
    return {"paths": paths, "sizes": sizes, "abstain": abstain}
