"""deploy/: the shipped nightly config, cron script and KubeRay manifests are valid and agree with the
code and with each other (paths, entry points, the Serve application)."""

import shlex
import subprocess
from pathlib import Path

import yaml

from pipelines.nightly import NightlyConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def mounts(pod_spec: dict) -> dict[str, str]:
    """mountPath -> volume name, for the first container of a pod template's spec."""
    return {m["mountPath"]: m["name"] for m in pod_spec["containers"][0].get("volumeMounts", [])}


def test_example_nightly_config_is_valid():
    config = NightlyConfig.from_yaml(DEPLOY / "nightly.yaml")
    assert [a.task for a in config.annotators] == ["classify", "ner", "generate"]
    assert config.output.startswith("/mnt/data/") and config.corpus.startswith("/mnt/data/")
    assert all(a.model.startswith("/mnt/models/") for a in config.annotators)


def test_cron_script_is_valid_bash_and_submits_the_nightly_job():
    script = DEPLOY / "cron" / "nightly-submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "ray job submit" in text and "jobs/nightly_annotate.py" in text and "--working-dir ." in text
    line = next(ln for ln in (DEPLOY / "cron" / "crontab").read_text().splitlines() if ln and ln[0].isdigit())
    assert len(line.split()) >= 6 and line.split()[5].endswith("deploy/cron/nightly-submit.sh")


def test_rayjob_runs_the_nightly_job_with_its_paths_mounted():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-nightly.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("/jobs/nightly_annotate.py")
    assert (ROOT / "jobs" / Path(argv[1]).name).exists()
    config_path = Path(argv[argv.index("--config") + 1])
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert mounts(head)[str(config_path.parent)] == "config"
    config = NightlyConfig.from_yaml(DEPLOY / "nightly.yaml")  # what the ConfigMap is made from
    for path in (config.corpus, config.output, *(a.model for a in config.annotators)):
        assert any(path.startswith(m + "/") for m in mounts(head)), path
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and cluster["enableInTreeAutoscaling"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert mounts(gpu["template"]["spec"]) == mounts(head)  # the workers read and write the same paths
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_same_application_as_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert serve.applications[0].import_path == local.applications[0].import_path
    assert set(serve.applications[0].args) == set(local.applications[0].args)
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    for task in serve.applications[0].args["tasks"].values():
        assert any(task["model"].startswith(m + "/") for m in mounts(worker)), task["model"]
    deployment = serve.applications[0].deployments[0]
    gpus = worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert deployment.ray_actor_options.num_gpus <= gpus


def test_image_holds_what_the_manifests_run():
    copied = " ".join(ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("COPY"))
    for needed in ("bloom", "pipelines", "jobs", "pyproject.toml"):
        assert f" {needed}" in copied, needed
    assert "FROM rayproject/ray:2.60.0" in (DEPLOY / "Dockerfile").read_text()
