"""Ray pipelines over the `bloom` replica: the offline labeling job (Ray Data) and the Serve app.

Read it as its folders: `tasks/` (what each task computes, and `tasks/settings.py`, every setting declared
once), `replica.py` (one loaded model that labels rows for a task), `corpus/` (the corpus job: plan, read,
write, verify, and `job.py` on Ray Data), `serve/` (the endpoint: routes, OpenAI's shapes, chat),
`nightly.py` (the incremental nightly job), `storage.py` (local, s3://, gs://). This module: joining or
starting Ray."""

import os
import socket
import time

CONNECT_TIMEOUT_S = 30.0  # how long a job tries to reach the cluster it was told to join


RAY_FLAGS = ("address", "ray_num_cpus", "ray_connect_timeout")  # the attributes `add_ray_flags` gives


def add_ray_flags(parser) -> None:
    """The flags every job takes to choose its Ray (an argparse parser; read back as RAY_FLAGS)."""
    parser.add_argument("--address", help="join this Ray cluster (its GCS host:port, 'auto' for the one `ray start` "
                                          "recorded here); default: RAY_ADDRESS, else start a local Ray of its own")
    parser.add_argument("--ray-num-cpus", type=int, help="local Ray only: CPUs to give it (default: all)")
    parser.add_argument("--ray-connect-timeout", type=float, default=CONNECT_TIMEOUT_S,
                        help=f"seconds to wait for the cluster to join to answer (default {CONNECT_TIMEOUT_S:g})")


class RayUnavailable(RuntimeError):
    """Ray could not be started or joined; the message is one line saying what to try."""


def cluster_address(address: str | None = None, num_cpus: int | None = None) -> str | None:
    """The cluster the user chose to join: `address` (a job's --address), else $RAY_ADDRESS, else None
    (start a local Ray of our own). ValueError when `num_cpus` is given with a cluster to join: a
    joined cluster's CPUs are its own. Cheap and Ray-free, so the jobs call it first."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    if address and num_cpus is not None:
        raise ValueError(f"--ray-num-cpus sizes a local Ray, but this job joins the cluster at {address} "
                         "(--address or RAY_ADDRESS), whose CPUs are its own: drop --ray-num-cpus, or unset "
                         "RAY_ADDRESS to start a local Ray")
    return address


def _host_port(address: str) -> tuple[str, int]:
    """host and port of a GCS address ('host:port', 'ray://host:port' or 'auto': the cluster that
    `ray start` recorded on this machine). RayUnavailable when it names none."""
    if address.startswith(("http://", "https://")):
        raise RayUnavailable(f"cannot join {address}: that is a dashboard address (for `ray job submit`); "
                             "give the head's GCS address, host:6379")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
        if not found:
            raise RayUnavailable("address 'auto': no cluster started with `ray start` is recorded on this machine")
        address = found
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"cannot join {address!r}: expected host:port (e.g. 10.0.0.1:6379)")
    return host, int(port)


def wait_reachable(address: str, timeout: float) -> None:
    """Return once the cluster's address accepts a TCP connection, trying for `timeout` seconds (a head
    just started may take a moment); RayUnavailable after that. `ray.init` itself retries an address
    nobody answers at for many minutes, so this bounds the wait."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RayUnavailable(f"the Ray cluster at {address} cannot be reached ({e.strerror or e}) within "
                                     f"{timeout:g} s: check the address (--address / RAY_ADDRESS) and that its head "
                                     "is running, or unset RAY_ADDRESS to start a local Ray") from None
            time.sleep(0.5)


def init_ray(num_cpus: int | None = None, address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
             **kwargs) -> str:
    """Join the cluster the user chose (`address`, else RAY_ADDRESS, as under `ray job submit`), else
    start a local Ray of this process's own (`address="local"`: never one that `ray start` left on the
    machine) without a dashboard, whose every process is stopped when this process ends, even by
    SIGKILL (see pipelines.reaper). Usage statistics stay off unless the environment turns them on.

    Returns one line saying which Ray this is, for the console. Raises ValueError for `num_cpus` with a
    cluster to join, and RayUnavailable (one line, what to try) when the cluster cannot be reached
    within `connect_timeout` seconds or refuses us, or when a local Ray fails to start."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = cluster_address(address, num_cpus)
    if address:
        wait_reachable(address, connect_timeout)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # noqa: BLE001 - auth, version and protocol errors alike: one line, not a traceback
            raise RayUnavailable(f"could not join the Ray cluster at {address}: {_first_line(e)} (token "
                                 "authentication: the client needs the cluster's RAY_AUTH_MODE and token)") from None
        cpus = ray.cluster_resources().get("CPU", 0)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return f"joined the Ray cluster at {address} ({nodes} node(s), {cpus:g} CPUs)"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. "The current node timed out during startup" on a loaded machine
        raise RayUnavailable(f"could not start a local Ray: {_first_line(e)}; try again when the machine is less "
                             "loaded, with fewer --ray-num-cpus, a short RAY_TMPDIR (Ray's socket paths are "
                             "limited), or join a running cluster with --address / RAY_ADDRESS") from None
    from .reaper import watch

    watch(ray.get_runtime_context().get_node_id())
    return f"started a local Ray of its own ({ray.cluster_resources().get('CPU', 0):g} CPUs)"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
