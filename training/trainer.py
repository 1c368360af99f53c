"""The training loop, top to bottom: FoRDE, or a deep ensemble when the repulsion is off.

Per step (docs/design.md section 1): loss = sum_i mean_b CE(f_i(x_b), y_b) + R, where R is the
input-gradient repulsion (`training.forde.repulsion_term`). SGD with Nesterov momentum,
weight decay as the Gaussian prior, the paper's learning-rate schedule. One checkpoint per
epoch, written atomically, so a killed run resumes from its last finished epoch and ends
exactly where an uninterrupted run would (same seed, CPU). Under torchrun the same loop runs
data-parallel (`training.distributed`): each rank computes its shard of every global batch and
a step equals the one-process step; rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open

from forde_serve._io import atomic_write_text
from forde_serve.errors import FordeError
from forde_serve.metrics import classification_metrics
from training import diversity
from training import run as run_files
from training.config import OptimConfig, TrainConfig
from training.data import Dataset, load_dataset
from training.distributed import (
    SINGLE,
    World,
    all_sum,
    average_gradients,
    broadcast_state,
    gather_rows,
    init_world,
    shard,
)
from training.evaluation import clean_metrics, member_probabilities
from training.forde import (
    PCA_MAX_INPUT_SIZE,
    lengthscale_scales,
    member_input_gradients,
    pca_basis,
    repulsion_with_bandwidth,
)
from training.models import Ensemble, parameter_count
from training.optim import build_optimizer, set_learning_rate

__all__ = [
    "Repulsion",
    "TrainingError",
    "learning_rate",
    "loss_terms",
    "resolve_device",
    "train",
    "train_step",
]


class TrainingError(FordeError, ValueError):
    """A run that cannot start or continue as asked; the message says what to do."""


@dataclass(frozen=True)
class Repulsion:
    """What the FoRDE term needs besides the gradients: basis `[D, K]`, scales `[K]`, subset size."""

    basis: torch.Tensor | None
    scales: torch.Tensor | None
    eps: float
    batch: int | None  # repulsion on the first `batch` inputs only; None = the whole batch
    strength: float = 1.0  # R enters the loss multiplied by this (1 = the paper)


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Constant for the first 50% of epochs, linear decay to lr_ratio * lr at 90%, constant after."""
    progress = epoch / optim.epochs
    if progress <= 0.5:
        factor = 1.0
    elif progress <= 0.9:
        factor = 1.0 - (1.0 - optim.lr_ratio) * (progress - 0.5) / 0.4
    else:
        factor = optim.lr_ratio
    return optim.lr * factor


def loss_terms(
    ensemble: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    repulsion: Repulsion | None,
    world: World = SINGLE,
    global_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sum over members of the batch-mean CE, R or None, bandwidths `[M, B']` or None) for raw `x`.

    Under several processes `x`, `y` are this rank's shard of a global batch of `global_rows`:
    the CE is over the shard, R over the whole global batch (gradient features all-gathered).
    """
    z = ensemble.normalize(x)
    subset = None if repulsion is None or not repulsion.batch or repulsion.batch >= len(x) else repulsion.batch
    if repulsion is None or subset is not None:
        logits = ensemble(x)
    if repulsion is not None:
        # With a subset, the gradients come from a second, smaller forward (the paper's cost cut);
        # with batch norm that forward also updates the running statistics, on the subset.
        rows = slice(None) if subset is None else slice(0, subset)
        subset_logits, grads = member_input_gradients(ensemble, z[rows], y[rows], create_graph=True)
        if subset is None:
            logits = subset_logits
        features = gather_rows(grads.flatten(2).transpose(0, 1), global_rows or len(x), world, dim=1)  # [M, B, D]
        r, bandwidth = repulsion_with_bandwidth(features, repulsion.basis, repulsion.scales, repulsion.eps)
    else:
        r = bandwidth = None
    members = logits.shape[1]
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(members)) * members
    return ce, r, bandwidth


def train_step(
    ensemble: Ensemble,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    repulsion: Repulsion | None,
    world: World = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step on the global batch `x` `[B, ...]`, `y` `[B]` (every rank passes the same).

    Each rank differentiates its share of the global objective (its shard's CE, weighted by the
    shard's size, plus R through its own rows); averaging the gradients over ranks then gives the
    one-process gradient, whatever the number of ranks. Returns (this rank's share of the summed
    member CE, R or None, bandwidths or None).
    """
    rows = len(x)
    mine = shard(rows, world)
    ce, r, bandwidth = loss_terms(ensemble, x[mine], y[mine], repulsion, world, rows)
    ce = ce * ((mine.stop - mine.start) / rows)
    loss = ce if r is None else ce + repulsion.strength * r
    optimizer.zero_grad(set_to_none=True)
    (loss * world.size if world.size > 1 else loss).backward()  # averaged over ranks just below
    average_gradients(ensemble, world)
    optimizer.step()
    return ce.detach(), r, bandwidth


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: 'cuda' was asked for but torch sees no usable CUDA device; use --device cpu")
    return torch.device(name)


def _repulsion_for(
    config: TrainConfig,
    data: Dataset,
    ensemble: Ensemble,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    world: World,
) -> Repulsion | None:
    if config.ensemble.method == "de":
        return None
    basis = scales = None
    mode = config.forde.lengthscale
    if mode != "identity":
        centred = mode == "pca_centred"  # pca and tuned use the reference's uncentred basis
        if resume:
            pca = run_files.read_pca(run_dir)
            if pca.centred != centred:
                raise TrainingError(
                    f"{run_dir / run_files.PCA} holds the {_basis_kind(pca.centred)} PCA basis (a file written "
                    f"before the basis was recorded always does), but forde.lengthscale = {mode!r} uses the "
                    f"{_basis_kind(centred)} one; a run keeps the basis it started with: set forde.lengthscale "
                    f"to {'pca_centred' if pca.centred else 'pca'!r} in {run_dir / run_files.CONFIG}, or train "
                    "the run again from the start"
                )
        else:
            with torch.no_grad():
                pca = pca_basis(ensemble.normalize(data.pca_inputs().to(device)), centred=centred)
            if world.is_main:
                run_files.write_pca(run_dir, pca)
        basis = pca.eigenvectors.to(device)
        scales = lengthscale_scales(config.forde.lengthscale, pca.eigenvalues, config.forde.alpha).to(device)
    return Repulsion(basis, scales, config.forde.eps, config.forde.batch, config.forde.strength)


def _basis_kind(centred: bool) -> str:
    return "centred" if centred else "uncentred"


def _check_basis_size(config: TrainConfig, input_shape: tuple[int, ...]) -> None:
    """Refuse, before anything is trained, a lengthscale whose PCA basis is too large to compute."""
    size = math.prod(input_shape)
    if config.ensemble.method == "forde" and config.forde.lengthscale != "identity" and size > PCA_MAX_INPUT_SIZE:
        raise TrainingError(
            f"forde.lengthscale = {config.forde.lengthscale!r} needs the eigendecomposition of a {size} x {size} "
            f"matrix (inputs of shape {tuple(input_shape)}), above the limit of {PCA_MAX_INPUT_SIZE} values per "
            "input; set forde.lengthscale = 'identity'"
        )


def _save_checkpoint(
    run_dir: Path, epoch: int, ensemble: Ensemble, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> None:
    tensors = {f"model/{k}": v for k, v in ensemble.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optim/{index}/{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
    tensors["rng/data"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    run_files.write_tensors(run_dir / run_files.CHECKPOINT, tensors, {"epoch": str(epoch)})


def _load_checkpoint(
    run_dir: Path, ensemble: Ensemble, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> int:
    """Restore the state after the last finished epoch; returns how many epochs are done."""
    path = run_dir / run_files.CHECKPOINT
    tensors = run_files.read_tensors(path)
    with safe_open(str(path), "pt") as f:
        epochs_done = int(f.metadata()["epoch"])
    device = next(ensemble.parameters()).device
    ensemble.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors["rng/data"])
    torch.set_rng_state(tensors["rng/torch"])
    return epochs_done


def _read_log(run_dir: Path, epochs_done: int) -> list[dict]:
    """Log lines of the finished epochs; a line written after the last checkpoint is dropped (redone)."""
    path = run_dir / run_files.LOG
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [line for line in lines if line["epoch"] <= epochs_done]


def _validation_scores(ensemble: Ensemble, data: Dataset) -> dict[str, float]:
    ensemble.eval()
    scores = classification_metrics(member_probabilities(ensemble, data.val.x), data.val.y.numpy())
    ensemble.train()
    return {"val_accuracy": scores["accuracy"], "val_nll": scores["nll"]}


def _prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool, world: World) -> None:
    run_files.check_run_dir(config, run_dir, resume, world.size)
    if not resume and world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / run_files.CONFIG, config.to_json())


def _rising_loss(log: list[dict], lr: float, factor: float = 1.25) -> str | None:
    """A warning when the training loss has risen for two epochs running to above `factor` times its
    lowest so far: SGD that is diverging slowly, which the non-finite check catches only at the end."""
    if len(log) < 3:
        return None
    last, before, earlier = log[-1]["ce"], log[-2]["ce"], log[-3]["ce"]
    lowest = min(entry["ce"] for entry in log)
    if last > before > earlier and last > factor * lowest:
        return (
            f"the training loss is rising (cross-entropy {earlier:.3f} -> {before:.3f} -> {last:.3f} in epochs "
            f"{len(log) - 2}-{len(log)}, lowest {lowest:.3f}): the run may be diverging; try a lower optim.lr "
            f"(now {lr:g}), fewer members per batch, or check the data"
        )
    return None


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, float] | None:
    """Train (or continue) the run in `run_dir`; returns the clean test metrics written to metrics.json.

    Launched by torchrun (WORLD_SIZE > 1), every rank runs this; rank 0 writes the run folder and
    returns the metrics, the other ranks return None.
    """
    run_dir = Path(run_dir)
    world, device_name = init_world(config.device)
    try:
        metrics = _train(
            config,
            run_dir,
            resume,
            progress and world.is_main,
            console or Console(stderr=True),
            world,
            resolve_device(device_name),
        )
        if world.size > 1:
            # The other ranks wait while rank 0 measures and writes the run: a rank that tore its Gloo
            # connections down first was seen to abort ("terminate called without an active exception").
            torch.distributed.barrier()
        return metrics
    finally:
        if world.size > 1:
            torch.distributed.destroy_process_group()


def _train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    console: Console,
    world: World,
    device: torch.device,
) -> dict[str, float] | None:
    _prepare_run_dir(config, run_dir, resume, world)
    torch.manual_seed(config.seed)
    data = load_dataset(config.data)
    _check_basis_size(config, data.input_shape)
    info = run_files.DatasetInfo.of(data)
    if not resume and world.is_main:
        info.write(run_dir)
    ensemble = run_files.new_ensemble(config, info, load_init=not resume).to(device)
    broadcast_state(ensemble, world)
    repulsion = _repulsion_for(config, data, ensemble, run_dir, resume, device, world)
    optim = config.optim
    optimizer = build_optimizer(ensemble, config)  # embedded ensembles: their own groups (training.optim)
    # Shuffling + augmentation, on the CPU; every rank draws the same global batches.
    generator = torch.Generator().manual_seed(config.seed)
    epochs_done, log = 0, []
    # Members' probabilities on a fixed probe set, before training and after every epoch (a run
    # resumed from before trajectories were kept records none).
    probe, probe_split = diversity.probe_inputs(data)
    frames = [diversity.probe_probabilities(ensemble, probe)]
    if resume:
        epochs_done = _load_checkpoint(run_dir, ensemble, optimizer, generator)
        log = _read_log(run_dir, epochs_done)
        trajectory = diversity.read_trajectory(run_dir, epochs_done + 1)
        frames = None if trajectory is None else list(torch.from_numpy(trajectory.probs))
        if world.is_main:
            console.print(f"resuming {run_dir} after epoch {epochs_done}/{optim.epochs}")

    steps_per_epoch = math.ceil(len(data.train) / optim.batch_size)
    step = epochs_done * steps_per_epoch
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        epoch_task = bar.add_task("epochs", total=optim.epochs, completed=epochs_done)
        warned = False
        for epoch in range(epochs_done, optim.epochs):
            started = time.perf_counter()
            lr = learning_rate(optim, epoch)
            set_learning_rate(optimizer, lr)
            ensemble.train()
            ce_sum = rows = repulsion_sum = bandwidth_sum = 0.0
            repulsion_steps = 0
            step_task = bar.add_task(f"epoch {epoch + 1}", total=steps_per_epoch)
            # batch norm and the median bandwidth need two inputs; every rank needs one
            for x, y in data.train_batches(generator, optim.batch_size, min_rows=max(2, world.size)):
                x, y = x.to(device), y.to(device)
                use_repulsion = repulsion is not None and step % config.forde.every == 0
                ce, r, bandwidth = train_step(ensemble, optimizer, x, y, repulsion if use_repulsion else None, world)
                step += 1
                ce_sum += ce.item() / ensemble.members * len(x)  # summed over ranks below
                rows += len(x)
                if r is not None:
                    repulsion_sum += r.item()
                    bandwidth_sum += bandwidth.median().item()
                    repulsion_steps += 1
                bar.advance(step_task)
            bar.remove_task(step_task)
            (ce_sum,) = all_sum([ce_sum], world)
            if not math.isfinite(ce_sum):
                raise TrainingError(
                    f"training diverged in epoch {epoch + 1} (cross-entropy is not finite); "
                    f"lower optim.lr (now {optim.lr})"
                )
            if world.is_main:
                entry = {
                    "epoch": epoch + 1,
                    "ce": ce_sum / rows,
                    "repulsion": repulsion_sum / repulsion_steps if repulsion_steps else None,
                    "bandwidth": bandwidth_sum / repulsion_steps if repulsion_steps else None,
                    "lr": lr,
                    **_validation_scores(ensemble, data),
                    "seconds": time.perf_counter() - started,
                }
                log.append(entry)
                warning = _rising_loss(log, optim.lr)
                if warning is not None and not warned:
                    warned = True  # once a run: the log has the rest
                    Console(stderr=True).print(f"warning: {warning}", markup=False, highlight=False)
                # Log first, checkpoint second: a log line without its checkpoint is dropped on resume.
                atomic_write_text(run_dir / run_files.LOG, "".join(json.dumps(line) + "\n" for line in log))
                if frames is not None:  # like the log: frames past the last checkpoint are dropped on resume
                    frames.append(diversity.probe_probabilities(ensemble, probe))
                    diversity.write_trajectory(run_dir, frames, probe_split)
                _save_checkpoint(run_dir, epoch + 1, ensemble, optimizer, generator)
                if progress:
                    rep = "" if entry["repulsion"] is None else f" repulsion {entry['repulsion']:.4f}"
                    console.print(
                        f"epoch {epoch + 1:>3}/{optim.epochs} ce {entry['ce']:.4f}{rep} lr {lr:.4g} "
                        f"val acc {entry['val_accuracy']:.4f} ({entry['seconds']:.1f}s)"
                    )
            bar.advance(epoch_task)

    if not world.is_main:
        return None
    ensemble.eval()
    # An image folder without test/ has only the parameter count (shared weights counted once).
    validation = (data.val.x.to(device), data.val.y)
    if data.test is None:
        metrics = {"parameters": parameter_count(ensemble)}
    else:
        metrics = clean_metrics(ensemble, data.test.x.to(device), data.test.y, validation)
    run_files.write_weights(run_dir, ensemble)
    atomic_write_text(run_dir / run_files.METRICS, json.dumps(metrics, indent=2))
    return metrics
