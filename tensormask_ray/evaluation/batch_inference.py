"""Batch inference over many images: one model per Ray Data actor (or this process alone), each
image's record appended to the result log as it arrives.

    source (shards | image files) -> [skip ids already in the log] -> map_batches(Predictor,
    ActorPoolStrategy(size=N)) -> driver appends one JSON line per image -> COCO results

The sources are in `image_sources`, the per-image work in `predictor`, the log in `result_log`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .coco import describe_ids
from .options import Execution
from .predictor import ModelSpec, Predictor
from .result_log import ResultLog


@dataclass
class InferenceOutcome:
    image_ids: list[int]  # the images asked for
    done_ids: set[int]  # those with detections (now or from an earlier run)
    failures: dict[int, tuple[str, str]]  # image_id -> (file_name, error), latest attempt
    resumed: int  # images skipped because an earlier run finished them
    processed: int  # images run now (including failures)
    seconds: float  # wall time of the inference
    log: ResultLog = field(repr=False)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def run_inference(
    source,
    spec: ModelSpec,
    log: ResultLog,
    image_ids: Sequence[int] | None = None,
    *,
    execution: Execution = Execution(),
    on_record: Callable[[dict[str, Any]], None] | None = None,
    loaded: tuple | None = None,
) -> InferenceOutcome:
    """Runs the model over the images of `source` (all, or `image_ids`) not yet in `log`,
    appending each image's record as it arrives. `execution.num_actors` 0 runs in this process,
    without Ray; N >= 1 uses a Ray Data actor pool of N (starting a local Ray, or joining
    `execution.address`, if Ray is not up). `execution.strict`: the first image that cannot be
    decoded raises UserError (after its record is logged). on_record(record) is called after each record is logged.

    Load the model in the driver first (`spec.load()`), so that a checkpoint that does not match
    its config fails here with the keys named, not inside an actor; pass the (model, cfg) as
    `loaded` and the in-process path uses it instead of loading again."""
    wanted = list(source.image_ids() if image_ids is None else image_ids)
    done_before = log.done_ids
    pending = set(wanted) - done_before
    resumed = len(set(wanted) & done_before)
    processed = 0
    t0 = time.perf_counter()

    def consume(record: dict[str, Any]) -> None:
        nonlocal processed
        log.append(record)
        processed += 1
        if execution.strict and record["error"]:
            raise UserError(f"{record['file_name']}: {record['error']} (--strict: stopped here)")
        if on_record is not None:
            on_record(record)

    if pending and execution.local:
        for record in _local_records(source, spec, pending, loaded):
            consume(record)
    elif pending:
        batches = _ray_batches(source, spec, pending, execution)
        with contextlib.closing(batches):  # an exception here stops the pipeline at once
            for batch in batches:
                for i in range(len(batch["image_id"])):
                    consume({key: values[i] for key, values in batch.items()})

    missing = pending - log.done_ids - set(log.failures())
    if missing:  # every pending image must come back, as detections or as an error
        raise RuntimeError(
            f"{len(missing)} images were sent but never came back: {describe_ids(missing)}"
        )
    return InferenceOutcome(
        image_ids=wanted,
        done_ids=log.done_ids & set(wanted),
        failures=log.failures(wanted),
        resumed=resumed,
        processed=processed,
        seconds=time.perf_counter() - t0,
        log=log,
    )


def _local_records(source, spec, pending, loaded) -> Iterator[dict[str, Any]]:
    """The records of the pending images, predicted one by one in this process (no Ray)."""
    predictor = Predictor(spec, loaded=loaded)
    for row in source.iter_rows(pending):
        yield predictor.predict_one(
            row["image_id"], row["file_name"], row.get("image_bytes"), row.get("path")
        )


def _ray_batches(source, spec, pending, execution: Execution):
    """The output batches of the actor pool, as they complete (numpy dicts)."""
    import ray

    from ..capacity import check_capacity, inference_reservation
    from ..console import ensure_ray, quiet_ray_data

    # Ray Data's re-blocking step (below) is a task that asks for one CPU, which Ray Data offers
    # no way to lower: if the actors held every CPU it would wait forever. A local Ray started
    # here gets at least one logical CPU more than the actors need (the step is light); on a
    # cluster with no CPU to spare, check_capacity fails at once.
    num_actors, batch_size = execution.num_actors, execution.batch_size
    cpus_per_actor, gpus_per_actor = execution.cpus_per_actor, execution.gpus_per_actor
    ensure_ray(execution.address, needed_cpus=num_actors * cpus_per_actor + 1)
    check_capacity(
        inference_reservation(num_actors, cpus_per_actor, gpus_per_actor), "batch inference"
    )
    remote_args: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor > 0:
        remote_args["num_gpus"] = gpus_per_actor
    with quiet_ray_data():  # our own progress lines print meanwhile
        # Blocks of `batch_size` rows: a task takes whole blocks, so a shard read as one block
        # would go to one actor in one piece, and its results would come back in one piece.
        ds = source.dataset(pending).repartition(target_num_rows_per_block=batch_size)
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"spec": spec, "num_threads": max(1, int(cpus_per_actor))},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **remote_args,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


__all__ = ["InferenceOutcome", "run_inference"]
