"""cluster.yaml: valid for Ray's cluster launcher, installs this project, keeps the dashboard private."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load())  # what `ray up` does first: merge the provider's defaults
    validate_config(config)  # raises on any schema violation
    assert config["available_node_types"][config["head_node_type"]]


def test_gpu_workers_autoscale_from_zero():
    workers = load()["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 < workers["max_workers"]


def test_setup_installs_this_project_and_dashboard_is_loopback_only():
    config = load()
    assert any("pip install" in c and "~/bloomline" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ubuntu/bloomline"] == "."
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_every_key_is_commented():
    for line in (ROOT / "cluster.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line or stripped.startswith(("DeviceName", "Ebs", "MarketType")), line
