"""How an embedded ensemble (batchensemble, mc_dropout) is laid out in its exported graphs, chosen by
measuring on the provider that will run them.

Two layouts compute the same outputs:

- "native": the embedded module as trained: ONE ordinary convolution / matmul per layer with the
  shared weights over the batch viewed as `[batch * M, C, ...]`, the modulations as elementwise
  products. The file holds the shared weights once (near one network's size).
- "folded": the modulations folded into per-member weights W_a = diag(r_a) W diag(s_a)
  (`training.models.folded_ensemble`), then the independent members' grouped graph (and its
  rewrites, `training.export.layout`). The file holds M networks' weights.

`choose_layouts` writes both, times each graph in onnxruntime at a few batch sizes (interleaved
rounds, medians) and takes, per graph, the layout with the lower geometric mean of its time over
the other's. The choice and what was measured go into the file's metadata (`LayoutChoice`).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from forde_serve.contract import GRAPHS, INPUT, TARGET, ModelCard
from training.export.checks import ExportContract, ExportError
from training.export.graphs import write_explain_graph, write_predict_graph
from training.models import Ensemble, folded_ensemble, parameter_count

__all__ = ["LAYOUTS", "LayoutChoice", "choose_layouts", "complete_card", "graph_modules", "layout_candidates"]

LAYOUTS = ("native", "folded")


@dataclass(frozen=True)
class LayoutChoice:
    """Which layout each graph was written in, and the measurements behind it (None: asked for, not measured).

    measured: graph -> layout -> {"batch_B_ms": median ms, ..., "bytes": file size} (without metadata)."""

    predict: str
    explain: str
    provider: str | None = None
    measured: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        for graph in GRAPHS:
            if getattr(self, graph) not in LAYOUTS:
                raise ExportError(f"layout: expected one of {', '.join(LAYOUTS)}, got {getattr(self, graph)!r}")

    def to_metadata(self) -> dict:
        return {"predict": self.predict, "explain": self.explain, "provider": self.provider, "measured": self.measured}

    @classmethod
    def fixed(cls, layout: str) -> LayoutChoice:
        """Both graphs in `layout`, as asked (nothing measured)."""
        if layout not in LAYOUTS:
            raise ExportError(f"--layout: expected auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
        return cls(layout, layout)


def layout_candidates(ensemble: Ensemble) -> dict[str, Ensemble]:
    """layout -> the module written in it (the same function either way)."""
    if ensemble.structure == "independent":
        raise ExportError("layout: only an embedded ensemble (batchensemble, mc_dropout) has layouts to choose")
    return {"native": ensemble, "folded": folded_ensemble(ensemble)}


def _elapsed_ms(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000.0


def choose_layouts(
    ensemble: Ensemble,
    example: torch.Tensor,
    contract: ExportContract | None = None,
    provider: str = "CPUExecutionProvider",
    batches: Sequence[int] = (1, 64),
    rounds: int = 7,
    echo: Callable[[str], None] = print,
) -> LayoutChoice:
    """Write both layouts of both graphs, time them on `provider` and choose per graph (see module doc).

    `example`: raw inputs `[n, *input_shape]` (n >= 1), tiled to each batch size."""
    import onnxruntime as ort

    contract = contract or ExportContract()
    candidates = layout_candidates(ensemble.eval())
    measured: dict[str, dict[str, dict]] = {graph: {} for graph in GRAPHS}
    with tempfile.TemporaryDirectory(prefix="forde-layouts-") as folder:
        sessions = {}
        for layout, module in candidates.items():
            paths = {"predict": Path(folder) / f"{layout}.onnx", "explain": Path(folder) / f"{layout}.explain.onnx"}
            write_predict_graph(module, paths["predict"], contract=contract)
            write_explain_graph(module, example[:2].float(), paths["explain"], contract=contract)
            for graph, path in paths.items():
                sessions[graph, layout] = ort.InferenceSession(str(path), providers=[provider])
                measured[graph][layout] = {"bytes": path.stat().st_size}
        for batch in batches:
            rows = np.resize(example.float().numpy(), (batch, *example.shape[1:])).astype(np.float32)
            feeds = {"predict": {INPUT: rows}, "explain": {INPUT: rows, TARGET: np.full(batch, -1, np.int64)}}
            times: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
            for key, session in sessions.items():  # warm-up
                session.run(None, feeds[key[0]])
            for turn in range(rounds):  # interleaved, the order rotated, so drifting load hits all alike
                keys = list(sessions)
                keys = keys[turn % len(keys) :] + keys[: turn % len(keys)]
                for key in keys:
                    session, feed = sessions[key], feeds[key[0]]
                    times[key].append(_elapsed_ms(lambda session=session, feed=feed: session.run(None, feed)))
            for (graph, layout), values in times.items():
                measured[graph][layout][f"batch_{batch}_ms"] = statistics.median(values)
    chosen = {}
    for graph in GRAPHS:
        ratio = math.prod(
            measured[graph]["native"][f"batch_{b}_ms"] / measured[graph]["folded"][f"batch_{b}_ms"] for b in batches
        ) ** (1.0 / len(batches))
        chosen[graph] = "native" if ratio <= 1.0 else "folded"
        echo(
            f"layout of the {graph} graph on {provider}: {chosen[graph]} (native / folded time, geometric mean "
            f"over batches {', '.join(map(str, batches))}: {ratio:.2f})"
        )
    return LayoutChoice(chosen["predict"], chosen["explain"], provider, measured)


def complete_card(
    ensemble: Ensemble,
    card: ModelCard,
    example: torch.Tensor,
    layout: str = "auto",
    contract: ExportContract | None = None,
    echo: Callable[[str], None] = print,
) -> ModelCard:
    """`card` with what the ensemble itself says: its structure, its parameter count and, for an
    embedded ensemble, each graph's layout (`layout` "auto": measured by `choose_layouts` unless the
    card already holds a choice; "native" / "folded": both graphs so, unmeasured)."""
    card = replace(card, structure=ensemble.structure, parameters=parameter_count(ensemble))
    if ensemble.structure == "independent":
        if layout != "auto":
            raise ExportError(
                f"--layout {layout}: native and folded are layouts of embedded ensembles (batchensemble, "
                "mc_dropout); independent members are written as one grouped graph"
            )
        return replace(card, layout=None)
    if layout == "auto" and card.layout is not None:
        return card
    choice = choose_layouts(ensemble, example, contract, echo=echo) if layout == "auto" else LayoutChoice.fixed(layout)
    return replace(card, layout=choice.to_metadata())


def graph_modules(ensemble: Ensemble, card: ModelCard) -> dict[str, Ensemble]:
    """graph (predict, explain) -> the module it is written from, in the layout `card.layout` names."""
    if card.layout is None:
        return {graph: ensemble for graph in GRAPHS}
    candidates = layout_candidates(ensemble)
    return {graph: candidates[card.layout[graph]] for graph in GRAPHS}
