"""jobs/serve_bloom.py as users run it: started in the background, stopped by a signal."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

import bloom
from bloom.tiny import make_tiny_checkpoint
from tests.jobs.test_submit import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_until_serving(proc: subprocess.Popen, url: str, body: dict, within: float = 180.0, timeout: float = 10.0) -> None:
    """Return once `url` answers `body` with 200. Any failure to answer (refused, reset, a first answer
    slower than the request's timeout on a loaded machine) means "not yet", until `within` seconds
    have passed or the server exited."""
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, "the endpoint exited before it came up"
        try:
            if requests.post(url, json=body, timeout=timeout).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"the endpoint did not come up within {within:g} s"
        time.sleep(0.5)


def classify_serve_config(tmp_path: Path, model: Path) -> Path:
    """serve_config.yaml with one classify task on `model` and one fixed replica of half a CPU."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    application = config["applications"][0]
    application["args"]["tasks"] = {"classify": {"model": str(model)}}
    application["deployments"][0].update(autoscaling_config=None, num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve_then_stop(config: Path, env: dict, sig: int, preexec_fn=None, while_serving=lambda: None):
    """Start jobs/serve_bloom.py on `config`, wait until it classifies, run `while_serving()`, send `sig`
    and return (returncode, stdout, stderr); a process still alive at the end is killed and reaped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve_bloom.py"), "--config", str(config),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec_fn)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}/v1/classify", {"inputs": "hello"})
        while_serving()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_waiting_for_readiness_survives_a_first_answer_slower_than_the_request_timeout():
    answered = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            if not answered:
                time.sleep(1.5)  # the first answer: longer than the client waits (a loaded machine)
            answered.append(1)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for the server process
    try:
        wait_until_serving(idle, f"http://127.0.0.1:{server.server_address[1]}/", {}, within=30, timeout=0.3)
        assert len(answered) >= 2  # the slow first answer was waited past, not taken as a failure
    finally:
        idle.kill()
        idle.wait()
        server.shutdown()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_endpoint_stops_cleanly_on_sigint_in_the_background_and_on_sigterm(tmp_path, sig):
    model = make_tiny_checkpoint(tmp_path / "clf", bloom.BloomForSequenceClassification, id2label={0: "a", 1: "b"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.pop("BLOOMLINE_API_KEY", None)
    # As a shell starts `... &`: SIGINT ignored (inherited through exec), so the script must take it back.
    returncode, out, err = serve_then_stop(classify_serve_config(tmp_path, model), env, sig,
                                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert returncode == 0 and "stopped" in out, err[-2000:]
    assert "SIGTERM received" not in err  # not Ray's crash handler's stack dump
