"""Cluster scale: cluster.yaml against Ray's own autoscaler validation, every job entry point's
--help and config errors, a real Ray head on loopback that runs the generate job submitted with
`ray job submit`, output to a non-local fsspec filesystem, and the GPU benchmark's CPU smoke run.

The real head is started with `ray start --head --block` in a process group of its own and torn
down by killing exactly the processes it started (never `ray stop`, which would also stop every
other Ray on a shared machine).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: its python and its ray
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")
JOBS = sorted(p for p in glob.glob(os.path.join(ROOT, "jobs", "*.py")) if not p.endswith("__init__.py"))
RUNTIME_ENV = json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}})


def env(**extra) -> dict:
    e = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
             TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".torch_extensions"))
    e.pop("RAY_ADDRESS", None)
    e.update(extra)
    return e


def run(args: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=kw.pop("env", env()), capture_output=True, text=True,
                          timeout=timeout, **kw)


# -- cluster.yaml ---------------------------------------------------------------------------------

def load_cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_validate(cfg: dict) -> dict:
    """What `ray up` does to the file before it launches anything: schema check, defaults, check."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(cfg)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    cfg = load_cluster()
    prepared = ray_validate(cfg)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "InstanceMarketOptions" not in head["node_config"], \
        "the head node must be on-demand and GPU-less"
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    spot = {n: t for n, t in workers.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    ondemand = {n: t for n, t in workers.items() if n not in spot}
    gpu_counts = {t["resources"]["GPU"] for t in workers.values()}
    assert 1 in gpu_counts and max(gpu_counts) >= 4, "one single-GPU type and one multi-GPU type"
    # Spot with on-demand fallback: each spot type has an on-demand twin of the same machine,
    # and the autoscaler prefers the spot one (higher priority).
    for name, t in spot.items():
        twins = [o for o in ondemand.values() if o["node_config"]["InstanceType"] == t["node_config"]["InstanceType"]]
        assert twins, f"spot type {name} has no on-demand fallback"
        assert all(o["resources"] == t["resources"] and o.get("priority", 0) < t.get("priority", 0) for o in twins)
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["min_workers"] for t in workers.values()) <= prepared["max_workers"]
    assert prepared["docker"]["image"] and prepared["docker"]["container_name"]
    assert any("import engine" in c for c in prepared["setup_commands"])
    for local in prepared["file_mounts"].values():
        assert os.path.exists(os.path.join(ROOT, local)), f"file_mounts source {local} is missing"
    # The jobs' runtime env disables Ray's token auth, so the cluster must start Ray the same way.
    for cmd in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "RAY_AUTH_MODE=disabled" in cmd


def _rename(cfg: dict, old: str, new: str) -> None:
    cfg[new] = cfg.pop(old)


@pytest.mark.parametrize("breakage, error", [
    (lambda c: _rename(c, "max_workers", "max_worker"), jsonschema.ValidationError),
    (lambda c: _rename(c["available_node_types"]["gpu8_spot"], "min_workers", "min_worker"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu1_spot"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    (lambda c: c["available_node_types"]["gpu1_spot"].update(min_workers=100), ValueError),
])
def test_ray_validation_rejects_a_broken_copy(breakage, error):
    """The validation above is the real one: a broken copy of the file fails it."""
    cfg = load_cluster()
    breakage(cfg)
    with pytest.raises(error):
        ray_validate(cfg)


def test_node_configs_are_valid_ec2_run_instances_requests():
    """Ray passes node_config to EC2 RunInstances as is; check it against botocore's EC2 model
    (offline) so that a misspelt field or instance type fails here, not at launch."""
    botocore_session = pytest.importorskip("botocore.session", reason="boto3 (needed by `ray up` on AWS)")
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters
    ec2 = botocore_session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    for name, t in load_cluster()["available_node_types"].items():
        validate_parameters(dict(t["node_config"], MinCount=1, MaxCount=1), shape)
        assert t["node_config"]["InstanceType"] in instance_types, name
    with pytest.raises(ParamValidationError):
        validate_parameters({"MinCount": 1, "MaxCount": 1, "InstanceTyp": "g5.xlarge"}, shape)


# -- job entry points -------------------------------------------------------------------------------

@pytest.mark.parametrize("job", JOBS, ids=[os.path.basename(j) for j in JOBS])
def test_job_help(job):
    result = run([sys.executable, job, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize("job", JOBS, ids=[os.path.basename(j) for j in JOBS])
def test_job_docstring_gives_its_ray_job_submit_line(job):
    with open(job) as f:
        source = f.read()
    doc = source.split('"""')[1] if source.lstrip().startswith('"""') else ""
    name = os.path.relpath(job, ROOT)
    assert "ray job submit" in doc and "--working-dir ." in doc and f"python {name}" in doc, \
        f"{name}'s docstring must give the `ray job submit --working-dir . ... -- python {name} ...` line"


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_config_error_is_one_line(tmp_path):
    out = tmp_path / "out"
    result = run([sys.executable, "jobs/generate.py", "--config", "configs/tiny.yaml",
                  f"output.path={out}", "synthesis.stepz=3"])
    assert_one_line_error(result, "synthesis.stepz")
    assert not out.exists(), "a config error must leave no output behind"
    result = run([sys.executable, "jobs/generate.py", "--config", "configs/no_such.yaml"])
    assert_one_line_error(result, "no_such.yaml")


def test_generate_dry_run_validates_without_a_cluster(tmp_path):
    out = tmp_path / "out"
    result = run([sys.executable, "jobs/generate.py", "--config", "configs/tiny.yaml", "--dry-run",
                  f"output.path={out}"])
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and not out.exists()


def test_export_of_missing_output_is_one_line(tmp_path):
    result = run([sys.executable, "jobs/export.py", "--output", str(tmp_path / "never_generated")])
    assert_one_line_error(result, "never_generated")


# -- a real Ray head ----------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop the head and everything it started (Ray workers and the job driver included), by
    process id: the head's own descendants, and nothing else on the machine."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback, every port chosen free (another Ray on the machine may hold
    Ray's default ports), stopped at teardown whatever the test did."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard=true", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
        cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"ray start exited: {open(log.name).read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                    if r.status == 200 and "block forever" in open(log.name).read():
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"the Ray head did not come up: {open(log.name).read()[-3000:]}"
            time.sleep(2)
        yield address
    finally:
        stop_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, submission_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`; it blocks until the job ends and exits non-zero if the job failed. The
    job agent starts a moment after the dashboard: its 'no agent' refusal (before any job exists)
    is retried, nothing else is."""
    for attempt in range(6):
        result = run([os.path.join(BIN, "ray"), "job", "submit", "--address", address,
                      "--submission-id", submission_id, "--working-dir", ".",
                      "--runtime-env-json", RUNTIME_ENV, "--", *entrypoint], timeout=420)
        if "No available agent" not in result.stderr + result.stdout:
            return result
        time.sleep(5)
    return result


def test_ray_job_submit_generate_on_a_real_head(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    from engine.config import load_config
    from engine.generation.prompts import make_prompts
    from engine.data.shards import iter_samples, shard_urls

    out = str(tmp_path / "out")
    # 4 prompts in 2 shards, 3 denoising steps: small, since the 2-core CI machine runs the head,
    # the job server, the driver and both actor pools at once.
    overrides = [f"output.path={out}", "prompts.images_per_category=1", "output.shard_size=2",
                 "synthesis.steps=3"]
    submission_id = f"instagen-test-{uuid.uuid4().hex[:8]}"
    result = submit(ray_head, submission_id,
                    ["python", "jobs/generate.py", "--config", "configs/tiny.yaml", *overrides])
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-5000:]

    status = run([os.path.join(BIN, "ray"), "job", "status", "--address", ray_head, submission_id])
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr
    client = JobSubmissionClient(ray_head)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED
    job_logs = client.get_job_logs(submission_id)
    assert "[generate] done:" in job_logs and "[export]" in job_logs

    # The driver joined this head (RAY_ADDRESS set by the job server) rather than starting an
    # embedded Ray: the head itself ran this job's synthesis and annotation actors.
    actors = list_actors(address=ray_head, filters=[("job_id", "=", info.job_id)], detail=True, limit=1000)
    classes = {a.class_name for a in actors}
    assert any("Synthesizer" in c for c in classes) and any("Annotator" in c for c in classes), classes

    cfg = load_config("configs/tiny.yaml", overrides)
    expected = make_prompts(cfg.prompts)
    keys = [s["__key__"] for s in iter_samples(shard_urls(out))]
    assert len(keys) == len(expected) == 4
    assert sorted(keys) == sorted(p.key for p in expected) and len(set(keys)) == len(keys)
    assert len(shard_urls(out)) == 2
    assert os.path.exists(os.path.join(out, "coco.json"))


# -- object-store output (s3:// on a local S3 server) ------------------------------------------------

@pytest.fixture(scope="module")
def s3_run(tmp_path_factory):
    """Generate into s3:// on moto's S3 server, with a Ray whose workers reach it as the driver
    does (fsspec reads FSSPEC_S3_* settings from the environment): the workers write the shards,
    so an object store that only the driver could see would not do."""
    import fsspec
    from conftest import ray_with_env
    from moto.server import ThreadedMotoServer

    from engine.config import load_config
    from engine.generation.pipeline import generate

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}", "FSSPEC_S3_KEY": "test", "FSSPEC_S3_SECRET": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {}).update(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], key="test",
                                                   secret="test")
    fsspec.filesystem("s3").mkdir("instagen-test")
    url = f"s3://instagen-test/run-{uuid.uuid4().hex[:8]}"
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      [f"output.path={url}", "prompts.images_per_category=1", "output.shard_size=3",
                       "synthesis.steps=3"])
    try:
        with ray_with_env(env):
            yield cfg, generate(cfg)
    finally:
        fsspec.config.conf.pop("s3", None)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def test_generate_writes_to_a_non_local_filesystem(s3_run):
    import tarfile

    import fsspec

    from engine.generation.prompts import make_prompts
    from engine.data.shards import ShardStore

    cfg, summary = s3_run
    expected = sorted(p.key for p in make_prompts(cfg.prompts))
    assert summary.images == len(expected) == 4 and summary.shards == 2
    store = ShardStore(cfg.output.path)
    assert sorted(store.finished()) == [0, 1]
    fs, root = fsspec.core.url_to_fs(cfg.output.path)
    assert fs.exists(f"{root}/run.json") and not fs.glob(f"{root}/shards/.*.tmp-*")
    keys = []
    for index in sorted(store.finished()):
        with fsspec.open(store.shard_url(index), "rb") as f, tarfile.open(fileobj=f) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    assert keys == expected


def test_export_reads_a_non_local_filesystem(s3_run):
    import fsspec

    from engine.generation.export import export

    cfg, summary = s3_run
    from engine.data.shards import iter_samples, shard_urls
    result = export(cfg.output.path)
    assert result["images"] == summary.images
    with fsspec.open(result["coco"], "r") as f:
        coco = json.load(f)
    assert len(coco["images"]) == summary.images
    fs, root = fsspec.core.url_to_fs(cfg.output.path)
    assert not fs.glob(f"{root}/.export-*"), "the staging folder is gone"
    for sample in iter_samples(shard_urls(cfg.output.path), decode=False):  # copied byte for byte
        assert fs.cat_file(f"{root}/images/{sample['__key__']}.jpg") == sample["jpg"]


# -- the GPU benchmark, smoke-run on CPU -----------------------------------------------------------------

def test_generate_gpu_bench_smoke_runs_on_cpu():
    result = run([sys.executable, "bench/generate_gpu.py", "--smoke"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| sdpa", "| xformers"))]
    sdpa = [r for r in rows if r[0].strip() == "sdpa"]
    assert [int(r[1]) for r in sdpa] == [1, 2] and all(float(r[3]) > 0 for r in sdpa), result.stdout
    assert any("no CPU kernels" in r[-1] for r in rows if r[0].strip() == "xformers"), result.stdout


# -- the embedded Ray ---------------------------------------------------------------------------------

def test_embedded_ray_quiets_the_placement_group_cleaner_it_cannot_serve():
    # Without a dashboard, Ray Train's cleaner warned once a second for a whole training run.
    import logging

    import ray

    from engine.runtime.cluster import PLACEMENT_GROUP_CLEANER_LOGGER, connect
    from engine.config import RayConfig

    @ray.remote(num_cpus=0)
    def level() -> int:
        return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

    ray.shutdown()  # connect() starts the embedded Ray only where none runs yet
    connect(RayConfig(num_cpus=1))
    try:
        assert ray.get(level.remote()) == logging.ERROR
    finally:
        ray.shutdown()
