"""Tests of the endpoint (pipelines/serve) over real HTTP, and the one way they start it."""

import contextlib
import socket


@contextlib.contextmanager
def endpoint(name: str, tasks: dict, key: str | None = None, **bind):
    """A BloomEndpoint serving `tasks` on a free local port under application `name` (the test session's
    Ray), half a CPU; key: the API key it requires; bind: its other arguments. Yields its base URL and
    deletes it, and Serve, after."""
    from ray import serve

    from pipelines.serve import BloomEndpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = {"num_cpus": 0.5, **({"runtime_env": {"env_vars": {"BLOOMLINE_API_KEY": key}}} if key else {})}
    serve.run(BloomEndpoint.options(ray_actor_options=options).bind(tasks=tasks, **bind), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(name)
        serve.shutdown()
