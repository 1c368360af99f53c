"""Batch scoring on a Ray cluster: the job's parts as Ray Data items, scored by a pool of actors that
each hold one onnxruntime session. Used by `forde_serve.scoring` (`forde score --engine ray`)."""

from __future__ import annotations

from collections.abc import Callable

from forde_serve._sources import InputFileError
from forde_serve.errors import FordeError

__all__ = ["import_ray", "score_parts_on_ray"]


class RayMissing(FordeError, ImportError):
    """`--engine ray` where Ray is not installed."""


def import_ray():
    """The `ray` module (with Ray Data), or RayMissing saying what to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayMissing("--engine ray needs Ray, which is not installed: pip install 'forde-serve[ray]'") from None
    return ray


def score_parts_on_ray(
    scorer: type,
    scorer_kwargs: dict,
    pending: list[int],
    address: str | None,
    workers: int | None,
    on_part: Callable[[int, int, int], None],
) -> None:
    """Score the `pending` parts with a pool of `scorer(**scorer_kwargs)` actors; `on_part(part, rows,
    failed)` for each finished part, as results stream back.

    Actors write the part files (OUTPUT must be on storage every node sees); the caller records each
    finished part in its manifest, so a killed job resumes the same way as a local one.
    """
    import logging

    ray = import_ray()

    # Ray Data's INFO lines (and its note that we drew our own progress bar) would bury ours.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=workers if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        actors = workers or gpus or max(1, int(resources.get("CPU", 1)))
        if not pending:
            return
        parts = ray.data.from_items([{"part": k} for k in pending], override_num_blocks=len(pending))
        scored = parts.map_batches(
            scorer,
            fn_constructor_kwargs=scorer_kwargs,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0 if gpus else 1,
            num_gpus=1 if gpus else 0,
            batch_format="numpy",
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for k, rows, failed, problem in zip(
                batch["part"], batch["rows"], batch["failed"], batch["problem"], strict=True
            ):
                if problem:  # the input broke under an actor: stop as the local engine does
                    raise InputFileError(str(problem))
                on_part(int(k), int(rows), int(failed))
    finally:
        if started_here:
            ray.shutdown()
