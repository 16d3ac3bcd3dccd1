"""Deploy files parse, agree with each other and with server/metrics.py: the dashboard only uses
series the server exports, Prometheus scrapes /metrics, compose mounts files that exist, the
Dockerfile runs as non-root with a health check, k8s manifests use the CLI's flags."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dsv4.json"
# `dsv4 serve` flags (server/cli.py).
SERVE_FLAGS = {
    "--model", "--host", "--port", "--api-key", "--served-model-name", "--tensor-parallel-size",
    "--enable-expert-parallel", "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory",
    "--no-prefix-cache", "--prefix-cache-unit", "--dtype", "--price-table",
}
SUFFIXES = {"gauge": ("",), "counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _exported_series() -> dict[str, set[str]]:
    """Series name as PromQL sees it -> label names it carries."""
    metrics = Metrics("m")
    metrics.count_tool_parse_error("bad_json")  # so every family has a sample to read labels from
    series = {}
    for family in metrics.registry.collect():
        labels = set().union(*(sample.labels for sample in family.samples))
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels
    return series


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def test_every_yaml_and_json_file_parses():
    files = sorted(DEPLOY.rglob("*.y*ml")) + [ROOT / "docker-compose.yml"]
    assert len(files) >= 6
    for path in files:
        assert _yaml_docs(path), path
    for path in sorted(DEPLOY.rglob("*.json")):
        assert json.loads(path.read_text()), path


def test_series_table_understands_prometheus_suffixes():
    series = _exported_series()
    assert "dsv4:prompt_tokens_total" in series and "dsv4:prompt_tokens" not in series
    assert series["dsv4:time_to_first_token_seconds_bucket"] == {"model_name", "le"}
    assert series["dsv4:kv_cache_pool_usage_perc"] == {"model_name", "pool"}
    assert "dsv4:iteration_tokens_total_bucket" in series


def test_dashboard_uses_only_series_and_labels_that_metrics_py_exports():
    series = _exported_series()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        names = re.findall(r"dsv4:[A-Za-z0-9_:]+", expr)
        assert names, f"no dsv4 metric in {expr!r}"
        for name in names:
            assert name in series, f"{name} (in {expr!r}) is not exported by server/metrics.py"
        for name, matchers in re.findall(r"(dsv4:[A-Za-z0-9_:]+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in series[name], f"{name} has no label {label!r} ({expr!r})"
        available = set().union(*(series[name] for name in names))
        for group in re.findall(r"by\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in available, f"'by ({label})' uses a label no series in {expr!r} has"
        assert 'model_name="$model_name"' in expr


def test_dashboard_covers_the_required_views():
    exprs = "\n".join(_dashboard_exprs())
    for needle in ("histogram_quantile(0.99, sum by (le) (rate(dsv4:time_to_first_token_seconds_bucket",
                   "dsv4:inter_token_latency_seconds_bucket", "dsv4:e2e_request_latency_seconds_bucket",
                   "dsv4:num_requests_running", "dsv4:num_requests_waiting", "dsv4:kv_cache_usage_perc",
                   "dsv4:kv_cache_pool_usage_perc", "dsv4:prefix_cache_hits_total", "dsv4:prefix_cache_queries_total",
                   "sum by (reason) (rate(dsv4:prefix_cache_misses_total", "sum by (kind) (rate(dsv4:cost_usd_total",
                   "sum by (finished_reason)", "dsv4:num_preemptions_total", "dsv4:generation_tokens_total",
                   "sum by (reason, kind) (rate(dsv4:prefix_cache_evictions_total", "dsv4:prefix_cache_checkpoints",
                   "dsv4:prefix_cache_checkpoint_bytes", "dsv4:prefix_cache_tier_hits_total",
                   "dsv4:prefix_cache_load_failures_total"):
        assert needle in exprs, needle


def test_dashboard_template_ids_and_datasource_match_provisioning():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "dsv4:num_requests_running" in variables["model_name"]["definition"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (source,) = _yaml_docs(DEPLOY / "grafana/provisioning/datasources/datasource.yml")[0]["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    used = {json.dumps(panel["datasource"], sort_keys=True) for panel in dashboard["panels"]}
    assert used == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


def test_prometheus_scrapes_dsv4_metrics_endpoint():
    config = _yaml_docs(DEPLOY / "prometheus/prometheus.yml")[0]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "dsv4"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["dsv4:8000"]


def test_compose_mounts_files_that_exist_and_wires_the_services():
    compose = _yaml_docs(ROOT / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) == {"dsv4", "prometheus", "grafana"}
    assert (ROOT / services["dsv4"]["build"] / "Dockerfile").is_file()
    assert services["dsv4"]["ports"] == ["127.0.0.1:8000:8000"]
    assert _flags(services["dsv4"]["command"]) <= SERVE_FLAGS
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts missing {host}"
                mounts[container] = ROOT / host
    assert mounts["/etc/prometheus/prometheus.yml"] == ROOT / "deploy/prometheus/prometheus.yml"
    provider = _yaml_docs(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")[0]["providers"][0]
    assert (mounts[provider["options"]["path"]] / DASHBOARD.name).is_file()
    assert mounts["/etc/grafana/provisioning/datasources"].is_dir()


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_non_root_with_healthcheck_and_entrypoint():
    instructions = _dockerfile_instructions()
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    ops = dict(final_stage)
    assert ops["FROM"].startswith("${CUDA_IMAGE}") or "cuda" in ops["FROM"]
    assert any("nvidia/cuda" in arg and "runtime" in arg for op, arg in instructions if op == "ARG")
    assert ops["USER"] not in ("root", "0")
    assert "/health" in ops["HEALTHCHECK"]
    assert ops["EXPOSE"].split() == ["8000"]
    assert json.loads(ops["ENTRYPOINT"]) == ["dsv4", "serve"]
    assert _flags(json.loads(ops["CMD"])) <= SERVE_FLAGS
    users = [i for i, (op, _) in enumerate(final_stage) if op == "USER"]
    assert [op for op, _ in final_stage[users[-1]:]].count("RUN") == 0  # nothing runs as root after USER


def test_no_open_endpoint_by_default():
    """Compose publishes every port on loopback and cannot start without an API key; the image
    listens on 0.0.0.0 without --allow-no-api-key, so `dsv4 serve` refuses to run keyless."""
    services = _yaml_docs(ROOT / "docker-compose.yml")[0]["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    assert services["dsv4"]["environment"]["DSV4_API_KEY"].startswith("${DSV4_API_KEY:?")
    cmd = json.loads(dict(_dockerfile_instructions())["CMD"])
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--allow-no-api-key" not in cmd and not any(arg.startswith("--api-key") for arg in cmd)
    for manifest in ("single-node.yaml", "multi-node-tp.yaml"):
        assert "--api-key=$(DSV4_API_KEY)" in (DEPLOY / "k8s" / manifest).read_text(), manifest


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_keeps_it():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    sources = [src for op, arg in _dockerfile_instructions() if op == "COPY" and "--from" not in arg
               for src in shlex.split(arg)[:-1]]
    assert {"pyproject.toml", readme, "server", "engine", "kernels"} <= set(sources)
    for src in sources:
        assert src not in ignored, f".dockerignore drops {src}"
        assert src == readme or (ROOT / src).exists(), src  # README.md: required by pyproject itself


def _containers(pod_spec: dict) -> dict:
    return {c["name"]: c for c in pod_spec["containers"]}


def test_single_node_manifest():
    docs = {doc["kind"]: doc for doc in _yaml_docs(DEPLOY / "k8s/single-node.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    template = docs["Deployment"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    container = _containers(template["spec"])["dsv4"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert _flags(container["args"]) <= SERVE_FLAGS and "--model" in _flags(container["args"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [docs["PersistentVolumeClaim"]["metadata"]["name"]]
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert docs["Service"]["spec"]["ports"][0]["port"] == 8000


def test_multi_node_manifest_sets_distributed_env_on_every_rank():
    docs = {doc["kind"]: doc for doc in _yaml_docs(DEPLOY / "k8s/multi-node-tp.yaml")}
    lws = docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    leader, worker = lws["leaderTemplate"], lws["workerTemplate"]
    for template in (leader, worker):
        container = _containers(template["spec"])["dsv4"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"} <= set(env)
        tp = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--tensor-parallel-size=")]
        assert tp == [env["WORLD_SIZE"]]
        assert _flags(container["args"]) <= SERVE_FLAGS
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) * lws["size"] == int(env["WORLD_SIZE"])
    assert _containers(leader["spec"])["dsv4"]["readinessProbe"]["httpGet"]["path"] == "/health"
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= leader["metadata"]["labels"].items()
    assert not selector.items() <= worker["metadata"]["labels"].items()  # traffic only to the leader


@pytest.mark.parametrize("expr, bad", [
    ('rate(dsv4:prompt_tokens{model_name="$model_name"}[1m])', "dsv4:prompt_tokens"),
    ('dsv4:num_requests_running_total{model_name="$model_name"}', "dsv4:num_requests_running_total"),
])
def test_the_series_check_rejects_names_prometheus_would_not_have(expr, bad):
    names = re.findall(r"dsv4:[A-Za-z0-9_:]+", expr)
    assert names == [bad] and bad not in _exported_series()
