"""Export a trained ensemble: write its predict and explain graphs, check them against PyTorch,
and give them the metadata a server needs (DESIGN's file contract: `forde_serve.contract`).

A file that does not match the PyTorch ensemble is removed, never left half-right.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from forde_serve.contract import INPUT, TARGET, ModelCard, ValidationChoices, explain_path
from forde_serve.metrics import uncertainty
from forde_serve.validation import choose_on_validation
from training.data import load_dataset
from training.evaluation import member_logits
from training.export.checks import ExportContract, validate_files
from training.export.graphs import write_explain_graph, write_predict_graph
from training.export.layouts import complete_card, graph_modules
from training.export.quantize import LoweredGraph, check_precision, lower_ensemble, lowered_contract
from training.forde import member_input_gradients
from training.models import Ensemble
from training.run import load_run

__all__ = ["HeldOutOptions", "export_ensemble", "export_run", "export_validated"]


def _reference(ensemble: Ensemble, x: torch.Tensor, target: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    """What the files must compute, from the PyTorch ensemble (autograd) and forde_serve's numpy maths."""
    with torch.no_grad():
        logits = ensemble(x) / temperature
    member_probs = logits.softmax(-1).double().numpy()
    probs = member_probs.mean(1)
    chosen = torch.where(target < 0, torch.from_numpy(probs.argmax(-1)), target)
    _, grads = member_input_gradients(ensemble, ensemble.normalize(x), chosen)
    # Where a ReLU unit sits at its kink, float32 rounding picks its side, and onnxruntime's rounding is
    # no less right than torch's: a map passes when it matches either torch's float32 gradient or a
    # float64 copy's (seen both ways: a 1-epoch digits run's map was 5% off torch float32 and 2e-7 off
    # float64; a ResNet18 BatchEnsemble's was 5% off float64 and within the check of float32).
    exact = copy.deepcopy(ensemble).double()
    _, exact_grads = member_input_gradients(exact, exact.normalize(x.double()), chosen)
    return {
        "probs": probs,
        "member_logits": logits.double().numpy(),
        "member_probs": member_probs,
        **uncertainty(member_probs),
        "input_gradients": tuple(
            (g / m.std / temperature).double().numpy() for g, m in ((grads, ensemble), (exact_grads, exact))
        ),
    }


def export_ensemble(
    ensemble: Ensemble,
    path: str | Path,
    card: ModelCard,
    validation_x: torch.Tensor,
    validation_target: torch.Tensor,
    contract: ExportContract | None = None,
    echo=print,
    lowered: LoweredGraph | None = None,
    layout: str = "auto",
) -> dict[str, Path]:
    """Write `path` (predict) and its `.explain.onnx` twin, then validate them; returns both paths.

    Each file's metadata is `card.to_metadata(graph)`, with the ensemble's structure, parameter count
    and (embedded ensembles) layout filled in (`training.export.layouts.complete_card`: `layout`
    auto | native | folded); both graphs divide the member logits by the card's temperature. On a
    failed validation both files are removed. The ensemble is switched to eval mode, float32, on the
    CPU (in place). With `lowered` (an int8 or fp16 predict graph at T = 1) that graph is the predict
    file, checked with its precision's tolerances (`lowered_contract`); the explain file stays float32
    and says so in its metadata.
    """
    contract = contract or ExportContract()
    temperature = card.temperature
    ensemble = ensemble.eval().cpu().float()
    path = Path(path)
    paths = {"predict": path, "explain": Path(explain_path(str(path)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    example = validation_x[:2].float()
    card = complete_card(ensemble, card, validation_x.float(), layout, contract, echo)
    modules = graph_modules(ensemble, card)  # the PyTorch reference below stays the ensemble as trained
    tmp = {graph: p.with_name(f".{p.name}.tmp") for graph, p in paths.items()}
    try:
        if lowered is None:
            write_predict_graph(modules["predict"], tmp["predict"], card.to_metadata("predict"), contract, temperature)
        else:
            lowered.write(tmp["predict"], card.to_metadata("predict"), temperature)
        explain_card = replace(card, precision="float32")
        write_explain_graph(
            modules["explain"], example, tmp["explain"], explain_card.to_metadata("explain"), contract, temperature
        )
        x = validation_x.float()
        feeds = {"predict": {INPUT: x.numpy()}, "explain": {INPUT: x.numpy(), TARGET: validation_target.numpy()}}
        reference = _reference(ensemble, x, validation_target, temperature)
        if lowered is None:
            validate_files(tmp, feeds, reference, contract, echo)
        else:
            predict_contract = lowered_contract(lowered.precision, ensemble.members, contract)
            validate_files({"predict": tmp["predict"]}, feeds, reference, predict_contract, echo)
            validate_files({"explain": tmp["explain"]}, feeds, reference, contract, echo)
        for graph in paths:
            tmp[graph].replace(paths[graph])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return paths


@dataclass(frozen=True)
class HeldOutOptions:
    """What `forde export` / `forde fuse` choose on held-out validation data, and how."""

    calibrate: bool = True  # fit a temperature (NLL of the ensemble) and bake it into both graphs
    score: str = "lac"  # conformal score: lac | aps | raps
    coverages: tuple[float, ...] = ()  # extra coverage levels (1 - alpha) beyond 0.8, 0.9, 0.95, 0.99
    k_reg: int | None = None  # raps only; None: chosen on the validation split
    lam: float | None = None  # raps only; None: chosen on the validation split
    target_risk: float = 0.01  # abstention: error rate the accepted predictions should reach


def export_validated(
    ensemble: Ensemble,
    path: str | Path,
    card: ModelCard,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    options: HeldOutOptions | None = None,
    check_inputs: int = 64,
    contract: ExportContract | None = None,
    echo=print,
    precision: str = "float32",
    layout: str = "auto",
) -> dict:
    """Export `ensemble` with what its validation split decides, then check the files against PyTorch.

    `validation` is (raw inputs, labels) of a split the ensemble was not trained on; on it, in this
    order (`forde_serve.validation.choose_on_validation`): the temperature (baked into both graphs),
    the conformal thresholds on the calibrated probabilities, and the abstention threshold on their
    mutual information. Its first `check_inputs` rows are the export check's inputs. Without it
    (None) the file is not calibrated (T = 1), gives no prediction sets and never abstains, and the
    check runs on uniform random inputs in [0, 1]. `card` describes the model (class names, input
    shape, members, method, ...); its `choices` are replaced by what the validation split decides, its
    structure, parameters and layout filled in from the ensemble (`layout`: see `export_ensemble`).

    `precision` int8 or fp16 lowers the predict graph (`training.export.quantize`; int8 calibrates on
    the validation inputs, so it needs them), and every choice above is fitted on the lowered graph's
    own member logits; the explain graph stays float32. An embedded ensemble's predict graph is
    lowered from the layout chosen for it (measured in float32).
    """
    options = options or HeldOutOptions()
    check_precision(precision, validation is not None)
    ensemble = ensemble.eval().cpu().float()
    # Structure, parameters and (embedded ensembles) layout first: a lowered graph is made in that layout.
    example = torch.rand(check_inputs, *ensemble.input_shape, generator=torch.Generator().manual_seed(0))
    card = complete_card(
        ensemble, card, example if validation is None else validation[0][:check_inputs].float(), layout, contract, echo
    )
    lowered = None
    if precision != "float32":
        calibration = None if validation is None else validation[0].float().numpy()
        lowered = lower_ensemble(graph_modules(ensemble, card)["predict"], precision, calibration, contract)
        notes = ", ".join(f"{k} {v}" for k, v in lowered.notes.items())
        echo(f"{precision} predict graph: {notes}; the explain graph stays float32")
    if validation is not None:
        x, y = validation
        chosen = choose_on_validation(
            member_logits(ensemble, x) if lowered is None else lowered.member_logits(x.float().numpy()),
            y.numpy(),
            calibrate_temperature=options.calibrate,
            score=options.score,
            coverages=options.coverages,
            k_reg=options.k_reg,
            lam=options.lam,
            target_risk=options.target_risk,
        )
        count = min(check_inputs, len(x))
        # Half the rows ask for the true class, half for the ensemble's own prediction (-1).
        check_x = x[:count]
        check_target = torch.where(torch.arange(count) % 2 == 0, y[:count], torch.full((count,), -1))
    else:
        chosen = None
        check_x = torch.rand(check_inputs, *ensemble.input_shape, generator=torch.Generator().manual_seed(0))
        check_target = torch.full((check_inputs,), -1)
    card = replace(card, choices=chosen or ValidationChoices(), precision=precision)
    paths = export_ensemble(ensemble, path, card, check_x, check_target, contract, echo, lowered)
    abstain = card.choices.abstention
    for warning in card.choices.warnings:
        echo(f"warning: {warning}")
    if chosen is None:
        echo("no validation data: no calibration, no prediction sets, and the file never abstains")
    else:
        if chosen.temperature is not None:
            fit = chosen.temperature
            echo(
                f"temperature {fit.temperature:.4g}: validation NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}, "
                f"ECE {fit.ece_before:.4f} -> {fit.ece_after:.4f}"
            )
        levels = ", ".join(f"{c:g}" for c in chosen.conformal.coverages)
        conformal = chosen.conformal
        grouped = ""
        if conformal.groups:
            plain = [f"{c:g}" for c in conformal.coverages if conformal.min_group_rows(c) > min(conformal.group_rows)]
            grouped = f", in {conformal.groups} groups of {conformal.group_score.replace('_', ' ')} (Mondrian)" + (
                f"; {', '.join(plain)} in one group (a group needs {conformal.min_group_rows(float(plain[0])):d} "
                "rows for it)"
                if plain
                else ""
            )
        echo(
            f"prediction sets ({conformal.score}) for coverage {levels}, on {conformal.n_calibration} validation "
            f"inputs{grouped}"
        )
        if chosen.reference is not None:
            echo(f"shift alarm: the validation split's {chosen.reference.score.replace('_', ' ')} as its reference")
        echo(
            f"abstain when mutual_information > {abstain.threshold:.4g}: validation coverage "
            f"{abstain.coverage:.1%} at error rate {abstain.validation_risk:.2%} (target {options.target_risk:.0%})"
        )
    return {
        "paths": paths,
        "sizes": {graph: p.stat().st_size for graph, p in paths.items()},
        "card": card,
    }


def export_run(
    run_dir: str | Path,
    path: str | Path,
    options: HeldOutOptions | None = None,
    validation_inputs: int = 64,
    contract: ExportContract | None = None,
    echo=print,
    precision: str = "float32",
    layout: str = "auto",
) -> dict:
    """Export a finished training run; what needs held-out data is chosen on its validation split
    (on the lowered graph's outputs with `precision` int8 or fp16, see `export_validated`; `layout`,
    of an embedded ensemble's graphs: auto | native | folded, see `export_ensemble`)."""
    run = load_run(run_dir)
    data = load_dataset(run.config.data, for_training=False)  # only the validation split is read
    forde = run.config.forde
    card = ModelCard(
        class_names=run.dataset.class_names,
        input_shape=run.dataset.input_shape,
        input_space=run.dataset.input_space,
        image=run.dataset.image,
        members=run.ensemble.members,
        method=run.config.ensemble.method,
        kernel={
            "lengthscale": forde.lengthscale,
            "alpha": forde.alpha,
            "every": forde.every,
            "batch": forde.batch,
            "strength": forde.strength,
        }
        if run.config.ensemble.method == "forde"
        else None,
        training_config=run.config.model_dump(),
        metrics=run.metrics,
    )
    echo(f"exporting {run_dir} ({run.ensemble.members} members) -> {path}")
    return export_validated(
        run.ensemble,
        path,
        card,
        (data.val.x, data.val.y),
        options,
        validation_inputs,
        contract,
        echo,
        precision,
        layout,
    )
