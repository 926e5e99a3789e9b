"""jobs/serve_bloom.py as users run it: started in the background, stopped by a signal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

import bloom
from bloom.tiny import make_tiny_checkpoint
from tests.jobs.test_submit import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_endpoint_stops_cleanly_on_sigint_in_the_background_and_on_sigterm(tmp_path, sig):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    application = config["applications"][0]
    application["args"]["tasks"] = {
        "classify": {"model": str(make_tiny_checkpoint(tmp_path / "clf", bloom.BloomForSequenceClassification,
                                                       id2label={0: "a", 1: "b"}))}}
    application["deployments"][0].update(autoscaling_config=None, num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.pop("BLOOMLINE_API_KEY", None)
    # As a shell starts `... &`: SIGINT ignored (inherited through exec), so the script must take it back.
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve_bloom.py"), "--config", str(tmp_path / "serve.yaml"),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the endpoint did not come up"
            try:
                if requests.post(f"http://127.0.0.1:{port}/v1/classify", json={"inputs": "hello"},
                                 timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "stopped" in out, err[-2000:]
    assert "SIGTERM received" not in err  # not Ray's crash handler's stack dump
