"""Ray pipelines over the `bloom` replica: the offline labeling job (Ray Data) and the Serve app."""

import os


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local Ray without a
    dashboard, whose every process is stopped when this process ends, even by SIGKILL (see
    pipelines.reaper). Usage statistics stay off unless the environment turns them on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        from .reaper import watch

        watch(ray.get_runtime_context().get_node_id())
