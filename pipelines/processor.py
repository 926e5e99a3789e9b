"""Label a Ray Dataset in your own pipeline: `label(ds, config) -> ds` with the job's replica stage.

    import ray
    from ray.data.expressions import col
    from pipelines.config import LabelConfig
    from pipelines.processor import label

    config = LabelConfig(task=..., model=..., max_new_tokens=32)  # the job's settings, model and task
    ds = label(ray.data.read_json("s3://bucket/notes/"), config)
    ds.filter(expr=col("error").is_null()).write_parquet("s3://bucket/labeled/")

(examples/label_s3.py is the whole pipeline, runnable.)

The labeling job (`pipelines.corpus.job`) is a user of the same stage (`replica_stage`): the same
replica, batching (`rows_per_batch`), pool sizing (`pool_resources`), per-row errors and output schema.
What the job adds around it, reading its own Parquet units and writing its own parts, is what makes a
run resumable and exactly-once; a Dataset labeled here is read and written by your pipeline, so a
failed run starts over.

A task that runs on the generation engine is fed continuously: the replica's engine runs on its own
thread, and each actor takes `batches_in_flight` batches at once (an async UDF, as `ray.data.llm`
does), so the next batch's rows join the running engine while the current batch's last rows finish;
a batch comes back as soon as its own rows are done.
"""

from __future__ import annotations

import asyncio
import math

import pyarrow as pa

from .config import LabelConfig
from .replica import BloomReplica
from .tasks import TASKS


def pool_resources(config: LabelConfig, cluster: dict, node_cpus: list[float]) -> dict:
    """Actor pool size and per-actor resources from the cluster's resources (`node_cpus`: the CPUs of
    each alive node; an actor must fit on one node).

    With GPUs: one actor per `num_gpus_per_actor` GPUs. CPU only: one CPU of the cluster stays free for
    Ray Data's read and write tasks (a pool holding every CPU starves them and the job hangs), and the
    rest is shared by actors of up to 8 CPUs each, the split that uses the most CPUs."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpu_each = config.num_gpus_per_actor if config.num_gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpu_each:
        if gpus < gpu_each:
            raise ValueError(f"each actor asks for {gpu_each} GPU(s) but the cluster has {gpus:g}")
        size = config.num_actors or max(1, int(gpus // gpu_each))
        cpu_each = config.num_cpus_per_actor or 1.0
        return {"min_size": min(config.min_actors, size), "max_size": size, "num_cpus": cpu_each,
                "num_gpus": gpu_each, "threads": max(1, math.ceil(cpu_each))}
    reserve = 1.0 if cpus >= 2 else cpus / 2
    caps = sorted(node_cpus or [cpus], reverse=True)
    caps[0] -= reserve  # the free CPU is taken from the largest node

    def fits(each: float) -> int:  # actors of `each` CPUs that the nodes hold
        return sum(int(cap // each + 1e-9) for cap in caps)

    if config.num_cpus_per_actor:
        cpu_each = config.num_cpus_per_actor
        if cpu_each > max(node_cpus or [cpus]) + 1e-9:
            raise ValueError(f"num_cpus_per_actor={cpu_each:g} is more than any node has (largest: "
                             f"{max(node_cpus or [cpus]):g} CPUs)")
        size = config.num_actors or max(1, fits(cpu_each))
    else:
        # Candidate sizes split some node evenly; keep those that fit the wanted pool size (or, without
        # one, use the most CPUs), preferring bigger actors (fewer model copies).
        candidates = [cap / k for cap in caps if cap > 0 for k in range(1, 65) if cap / k <= 8]
        if config.num_actors:
            size = config.num_actors
            cpu_each = max((c for c in candidates if fits(c) >= size), default=0.0)
            if not cpu_each:
                cpu_each = (cpus - reserve) / size
        else:
            cpu_each = max(candidates, key=lambda c: (round(c * fits(c), 6), c), default=cpus / 2)
            size = max(1, fits(cpu_each))
    if cpu_each * size > cpus - reserve + 1e-9:
        raise ValueError(f"{size} actor(s) × {cpu_each:g} CPUs would take all {cpus:g} CPUs of the cluster, "
                         "leaving none for reading and writing: lower num_actors or num_cpus_per_actor")
    # On one node the actors' torch threads also use the CPU kept for reading and writing (light work).
    threads = int(node_cpus[0] // size) if len(node_cpus) == 1 else int(cpu_each)
    return {"min_size": min(config.min_actors, size), "max_size": size, "num_cpus": cpu_each,
            "num_gpus": 0.0, "threads": max(1, threads)}


def cluster_pool(config: LabelConfig) -> dict:
    """`pool_resources` for the Ray cluster this process is connected to."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return pool_resources(config, ray.cluster_resources(), [c for c in node_cpus if c] or [1.0])


class FedReplica:
    """A `BloomReplica` whose generation engine runs on its own thread and takes several batches at once.

    `await fed(batch) -> table`: the batch's rows are submitted to the running engine (joining the rows
    of the other batches in flight) and its table comes back when they have finished. The labeling
    itself runs on a worker thread (`asyncio.to_thread`), so Ray Data's event loop stays free to hand
    over the next batch. engine_steps: add the job's engine-steps column (see `BloomReplica.__call__`)."""

    def __init__(self, config: LabelConfig, num_threads: int | None = None):
        self.replica = BloomReplica(config, num_threads=num_threads)
        self.replica.start_engine()

    async def __call__(self, batch: pa.Table, engine_steps: bool = True) -> pa.Table:
        return await asyncio.to_thread(self.replica, batch, engine_steps)


def replica_stage(ds, config: LabelConfig, pool: dict, engine_steps: bool = True):
    """ds (Arrow batches with the task's input columns) mapped through a pool of replicas sized by
    `pool` (from `pool_resources`); one output row per input row: the pass-through columns the batch
    has (id, keep_columns, provenance), the task's columns, `input_tokens`, `truncated`, `error`, and,
    for an engine task with engine_steps, the job's engine-steps column. Ray Data restarts dead actors
    and retries their batches."""
    from ray.data import ActorPoolStrategy

    fed = TASKS[config.task].runs_on_engine
    in_flight = config.batches_in_flight if fed else None  # None: Ray Data's defaults
    return ds.map_batches(
        FedReplica if fed else BloomReplica,
        fn_constructor_kwargs={"config": config, "num_threads": pool["threads"]},
        fn_kwargs={"engine_steps": engine_steps},
        # A fed actor runs `in_flight` batches at once (Ray Core's max_concurrency): they share one engine.
        compute=ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"],
                                  max_tasks_in_flight_per_actor=in_flight,
                                  max_concurrent_calls_per_actor=in_flight),
        batch_size=config.rows_per_batch, batch_format="pyarrow", num_cpus=pool["num_cpus"],
        num_gpus=pool["num_gpus"])


def label(ds, config: LabelConfig, pool: dict | None = None):
    """ds labeled by config.task with config's settings: a new Dataset (lazy, as Ray Data's are).

    ds: any ray.data.Dataset whose rows hold the task's input columns (e.g. `text` for generate); a
    missing or bad value gives that row an `error`, it never fails the run. Output rows: config.id_column
    and config.keep_columns where ds has them, then the task's columns, `input_tokens`, `truncated` and
    `error` (null when labeled) — the job's output schema. pool: `pool_resources`' dict (default: sized
    from the connected cluster). FileNotFoundError / ValueError before any work for a model that cannot
    do the task, bad settings, or a Dataset whose schema is known and lacks an input column."""
    from .corpus.job import check_checkpoint  # the job's model checks, at call time (the job imports us)

    config = check_checkpoint(config)
    schema = ds.schema(fetch_if_missing=False)
    needed = TASKS[config.task].input_columns(config)
    if schema is not None and (missing := [c for c in needed if c not in schema.names]):
        raise ValueError(f"the dataset has no column {', '.join(missing)} (task {config.task!r} reads "
                         f"{', '.join(needed)}; it has {', '.join(schema.names)})")
    return replica_stage(ds, config, pool or cluster_pool(config), engine_steps=False)


__all__ = ["FedReplica", "cluster_pool", "label", "pool_resources", "replica_stage"]
