"""deploy/: the image, the compose file, the NATS configs and the Kubernetes manifests.

No Docker engine and no Kubernetes cluster run here, so nothing is built or started. What
can be checked without them is checked for real: the manifests against the Kubernetes
schemas (kubernetes_validate, offline, strict), the kustomization with `kubectl kustomize`,
the NATS configs with nats-server's own config check, the NATS identities and seeds with
the real `tollgate nats-config`, and every command, variable, file and key they name
against the code and against each other.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import nkeys
import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from infra.settings import Settings
from services.api.options import ApiOptions
from services.policy.config import parse_config
from tollgate.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NATS_SERVER = Path(sys.executable).parent / "nats-server"
K8S_VERSION = "1.35"  # a release kubernetes_validate ships; the pod-index label needs 1.28+
SERVICES = ("ledger", "policy", "api", "meter")
SECRETS_EXAMPLE = "secrets.example.yaml"
SECRET_VARS = ("POSTGRES_PASSWORD", "TOLLGATE_ADMIN_TOKEN", "TOLLGATE_TOKEN_SECRET")


# --- what the code offers ----------------------------------------------------------------


def cli() -> Any:
    """The `tollgate` command as click sees it: `.commands`, each with its `.params`."""
    return typer.main.get_command(app)


def env_names(model: type[Any]) -> set[str]:
    prefix = model.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in model.model_fields}


def known_env(command: str) -> set[str]:
    """Variables `tollgate COMMAND` reads: Settings, the api's options, the command's own."""
    names = env_names(Settings) | (env_names(ApiOptions) if command == "api" else set())
    for param in cli().commands[command].params:
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        names |= {e for e in envvars if e}
    return names


def nats_check(conf: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """nats-server's own configuration check (-t): parses, resolves includes and variables."""
    return subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=conf.parent,
        check=False,
    )


def nats_config(out: Path, *args: str) -> Path:
    """Run the real `tollgate nats-config`, as compose's one-shot and the k8s docs do."""
    if "nats-config" not in cli().commands:
        pytest.skip("`tollgate nats-config` is not registered in tollgate.cli")
    result = CliRunner().invoke(app, ["nats-config", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def stub_auth(path: Path) -> Path:
    """A minimal auth.conf with one real nkey user, for configs checked on their own."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"authorization {{\n  users: [ {{nkey: {public}}} ]\n}}\n")
    return path


# --- compose -----------------------------------------------------------------------------

INTERPOLATION = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`."""

    def one(m: re.Match[str]) -> str:
        name, kind, rest = m[1], m[2], m[3]
        if env.get(name):
            return env[name]
        if kind == "?":
            raise LookupError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return INTERPOLATION.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def one_shots(compose: dict[str, Any]) -> set[str]:
    """Services others wait to see finish (`service_completed_successfully`)."""
    return {
        name
        for s in services(compose).values()
        for name, dep in (s.get("depends_on") or {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }


def test_every_long_running_compose_service_has_a_health_check(compose: dict[str, Any]) -> None:
    jobs = one_shots(compose)
    for name, service in services(compose).items():
        if name in jobs:
            assert service.get("restart") == "no", f"{name} is a one-shot job: restart: 'no'"
            continue
        check = service.get("healthcheck", {})
        assert check.get("test"), f"compose service {name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_services_start_only_after_what_they_need_is_healthy(
    compose: dict[str, Any],
) -> None:
    all_services = services(compose)
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for target, dep in depends.items():
            condition = dep.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), (
                f"{name} -> {target}: {condition}"
            )
            if condition == "service_healthy":
                assert "healthcheck" in all_services[target], f"{target} has no health check"
    for name in ("ledger", "policy", "api"):
        assert set(all_services[name]["depends_on"]) >= {"nats", "postgres"}, name


def test_the_four_tollgate_services_run_one_image_built_from_the_repository_root(
    compose: dict[str, Any],
) -> None:
    tollgate = [services(compose)[name] for name in SERVICES]
    assert len({s["image"] for s in tollgate}) == 1
    assert all(s["build"] == tollgate[0]["build"] for s in tollgate)
    build = tollgate[0]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()


def test_compose_environment_names_are_variables_tollgate_reads(compose: dict[str, Any]) -> None:
    commands = cli().commands
    for name, service in services(compose).items():
        command = (service.get("command") or [None])[0]
        if command not in commands:
            continue
        unknown = {k for k in service.get("environment", {}) if k.startswith("TOLLGATE_")}
        unknown -= known_env(command)
        assert not unknown, f"compose service {name} sets {unknown}: not read by `{command}`"


def test_compose_commands_are_tollgate_sub_commands_with_real_options(
    compose: dict[str, Any],
) -> None:
    image = services(compose)["ledger"]["image"]
    for name, service in services(compose).items():
        if service.get("image") != image:
            continue
        command, *args = service["command"]
        assert command in cli().commands, f"{name}: `tollgate {command}` does not exist"
        options = {o for p in cli().commands[command].params for o in p.opts}
        assert {a for a in args if a.startswith("--")} <= options, name


def test_files_compose_mounts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts {source}: missing"


def test_compose_secrets_come_from_the_env_file_and_fail_loudly_when_missing(
    compose: dict[str, Any],
) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for var in SECRET_VARS:
        uses = re.findall(rf"\$\{{{var}(:.)?[^}}]*\}}", text)
        assert uses and all(kind == ":?" for kind in uses), f"{var} must be ${{{var}:?...}}"
    api = services(compose)["api"]["environment"]
    with pytest.raises(LookupError, match=r"deploy/\.env"):
        interpolate(api["TOLLGATE_TOKEN_SECRET"], {})


def materialise(service: dict[str, Any], root: Path, volumes: dict[str, Path]) -> None:
    """Lay out a compose service's mounts under `root` as the container would see them."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        where = root / target.lstrip("/")
        origin = DEPLOY / source if source.startswith(".") else volumes.get(source)
        if origin is None or not origin.exists():
            continue
        where.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, where, dirs_exist_ok=True)
        else:
            shutil.copy(origin, where)


def test_compose_stack_fits_together_with_what_nats_config_writes(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The one-shot's real output, mounted as compose mounts it: seeds, quotas, NATS config."""
    env = {var: "x" for var in SECRET_VARS}
    all_services = services(compose)
    job = [interpolate(a, env) for a in all_services["nats-auth"]["command"]]
    out = job.index("--out") + 1
    generated = nats_config(tmp_path / "nats-auth", *job[1 : out - 1], *job[out + 1 :])

    for name, service in all_services.items():
        root = tmp_path / "containers" / name
        materialise(service, root, {"nats-auth": generated})
        environment = {k: interpolate(v, env) for k, v in service.get("environment", {}).items()}
        seed = environment.get("TOLLGATE_NATS_NKEY_SEED_FILE")
        if name in SERVICES:
            assert seed, f"{name} has no NATS identity"
            key = (root / seed.lstrip("/")).read_text().strip()
            assert key.startswith("SU"), f"{name}: {seed} is not a user seed"
            public = nkeys.from_seed(bytearray(key.encode())).public_key.decode()
            assert public in (generated / "auth.conf").read_text(), f"{name}: unknown to NATS"
        if "TOLLGATE_CONFIG" in environment:
            quotas = root / environment["TOLLGATE_CONFIG"].lstrip("/")
            parse_config(quotas.read_text(), str(quotas))

    nats = all_services["nats"]
    conf = (
        tmp_path
        / "containers"
        / "nats"
        / nats["command"][nats["command"].index("--config") + 1].lstrip("/")
    )
    checked = nats_check(conf)
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_compose_meter_gets_the_hosts_network_processes_and_capabilities(
    compose: dict[str, Any],
) -> None:
    meter = services(compose)["meter"]
    assert meter["network_mode"] == "host" and meter["pid"] == "host"
    assert meter["cgroup"] == "host"
    assert {"NET_ADMIN", "NET_RAW"} <= set(meter["cap_add"]) and meter["cap_drop"] == ["ALL"]
    assert meter["user"] == "0:0"


# --- Kubernetes --------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    found = []
    for path in manifest_files():
        found += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def tollgate_containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The container running `tollgate <service>`, by service."""
    found = {}
    for w in workloads(docs):
        for c in containers(w):
            if c.get("args", [None])[0] in SERVICES:
                found[c["args"][0]] = c
    return found


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_rejects_a_field_kubernetes_does_not_know(
    docs: list[dict[str, Any]],
) -> None:
    meter = dict(by_kind(docs, "DaemonSet")["tollgate-meter"])
    meter["spec"] = {**meter["spec"], "hostNetwork": True}  # belongs in the pod spec
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(meter, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_placeholders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifest_files()} - {SECRETS_EXAMPLE}
    assert SECRETS_EXAMPLE not in listed, "applying placeholders would overwrite real secrets"


def test_kustomize_renders_the_manifests_into_valid_objects(docs: list[dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here: `kubectl kustomize` cannot be run")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    expected = [d for d in docs if d["kind"] != "Secret"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in expected
    )


def test_every_tollgate_workload_runs_the_same_image(docs: list[dict[str, Any]]) -> None:
    found = tollgate_containers(docs)
    assert set(found) == set(SERVICES)
    images = {c["image"] for c in found.values()}
    assert len(images) == 1
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == [images.pop().split(":")[0]]


def test_kubernetes_env_names_are_variables_tollgate_reads(docs: list[dict[str, Any]]) -> None:
    config_maps = by_kind(docs, "ConfigMap")
    for service, c in tollgate_containers(docs).items():
        names = {e["name"] for e in c.get("env", [])}
        for source in c.get("envFrom", []):
            names |= set(config_maps[source["configMapRef"]["name"]]["data"])
        unknown = {n for n in names if n.startswith("TOLLGATE_")} - known_env(service)
        assert not unknown, f"`tollgate {service}` does not read {unknown}"


def test_kubernetes_expands_only_variables_defined_before_their_use(
    docs: list[dict[str, Any]],
) -> None:
    """`$(VAR)` in an env value works only for a VAR earlier in the list; else it stays."""
    for w in workloads(docs):
        for c in containers(w):
            defined: set[str] = set()
            for e in c.get("env", []):
                for used in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    assert used in defined, f"{w['metadata']['name']}: {e['name']} uses {used}"
                defined.add(e["name"])


def secret_keys(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    example = [d for d in yaml.safe_load_all((K8S / SECRETS_EXAMPLE).read_text()) if d]
    assert all(d["kind"] == "Secret" for d in example)
    return {d["metadata"]["name"]: set(d.get("stringData", {})) for d in example}


def references(workload: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """Every (kind, name, key) a pod reads from a Secret or a ConfigMap; key None = all."""
    for c in containers(workload):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in ref:
                    yield kind, ref[field]["name"], ref[field]["key"]
        for source in c.get("envFrom", []):
            for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if field in source:
                    yield kind, source[field]["name"], None
    for volume in workload["spec"]["template"]["spec"].get("volumes", []):
        sources = volume.get("projected", {}).get("sources", [volume])
        for s in sources:
            for kind, field, name_field in (
                ("Secret", "secret", "secretName"),
                ("ConfigMap", "configMap", "name"),
            ):
                if field in s:
                    name = s[field].get(name_field) or s[field].get("name")
                    items = s[field].get("items") or [{"key": None}]
                    for item in items:
                        yield kind, name, item["key"]


def test_every_secret_and_config_map_a_pod_reads_exists_with_that_key(
    docs: list[dict[str, Any]],
) -> None:
    keys = {("ConfigMap", n): set(d["data"]) for n, d in by_kind(docs, "ConfigMap").items()}
    keys |= {("Secret", n): k for n, k in secret_keys(docs).items()}
    for w in workloads(docs):
        for kind, name, key in references(w):
            where = f"{w['metadata']['name']}: {kind} {name}"
            assert (kind, name) in keys, f"{where} is not defined in deploy/k8s"
            assert key is None or key in keys[(kind, name)], f"{where} has no key {key}"


def test_files_a_container_is_pointed_at_are_in_its_volumes(docs: list[dict[str, Any]]) -> None:
    """TOLLGATE_CONFIG and the seed file lie in a mount that carries that very key."""
    for w in workloads(docs):
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(w):
            for e in c.get("env", []):
                if e["name"] not in ("TOLLGATE_CONFIG", "TOLLGATE_NATS_NKEY_SEED_FILE"):
                    continue
                path = Path(e["value"])
                mounts = [m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"])]
                assert mounts, f"{w['metadata']['name']}: {e['name']}={path} is in no volume"
                mount = mounts[0]
                volume = volumes[mount["name"]]
                source = volume.get("secret") or volume.get("configMap")
                relative = str(path.relative_to(mount["mountPath"]))
                if "items" in source:
                    assert relative in {i["path"] for i in source["items"]}, e
                else:  # the whole Secret: the meter's seeds, one per node name
                    assert relative == "$(TOLLGATE_HOST).nk", e


def test_meter_daemonset_meters_the_host_with_net_admin(docs: list[dict[str, Any]]) -> None:
    pod = by_kind(docs, "DaemonSet")["tollgate-meter"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (meter,) = pod["containers"]
    security = meter["securityContext"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(security["capabilities"]["add"])
    assert security["capabilities"]["drop"] == ["ALL"] and security["runAsUser"] == 0
    mounts = {m["mountPath"]: m for m in meter["volumeMounts"]}
    assert mounts["/sys/fs/cgroup"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts["/var/lib/tollgate/meter"]["name"]]
    assert state["hostPath"]["path"] == "/var/lib/tollgate/meter"
    env = {e["name"]: e for e in meter["env"]}
    assert env["TOLLGATE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["TOLLGATE_METER_STATE_DIR"]["value"] == "/var/lib/tollgate/meter"


def test_quota_configuration_in_the_config_map_loads_and_matches_compose(
    docs: list[dict[str, Any]],
) -> None:
    text = by_kind(docs, "ConfigMap")["tollgate-quotas"]["data"]["quotas.yaml"]
    config = parse_config(text, "deploy/k8s/configmap.yaml")
    assert config.quotas
    assert text == (DEPLOY / "quotas.yaml").read_text(), "copy deploy/quotas.yaml over"


def test_nats_config_map_carries_the_cluster_config(docs: list[dict[str, Any]]) -> None:
    text = by_kind(docs, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert text == (DEPLOY / "nats" / "cluster.conf").read_text(), "copy cluster.conf over"


def settings_of(container: dict[str, Any], config_maps: dict[str, Any], **extra: str) -> Settings:
    """Settings as the container would build them (secrets and downward API filled in)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]["data"]
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "placeholder")
    env |= extra
    return Settings(**{k.removeprefix("TOLLGATE_").lower(): v for k, v in env.items()})


def test_each_partition_has_exactly_one_ledger_and_one_policy_pod(
    docs: list[dict[str, Any]],
) -> None:
    config_maps = by_kind(docs, "ConfigMap")
    partitions = int(config_maps["tollgate-env"]["data"]["TOLLGATE_PARTITIONS"])
    sets = by_kind(docs, "StatefulSet")
    for name in ("tollgate-ledger", "tollgate-policy"):
        assert sets[name]["spec"]["replicas"] == partitions, f"{name} replicas != partitions"
        (c,) = containers(sets[name])
        env = {e["name"]: e for e in c["env"]}
        field = env["TOLLGATE_PARTITION"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "metadata.labels['apps.kubernetes.io/pod-index']"
        for ordinal in range(partitions):
            assert settings_of(c, config_maps, TOLLGATE_PARTITION=str(ordinal)).partition == ordinal
        with pytest.raises(ValueError, match="TOLLGATE_PARTITION"):
            settings_of(c, config_maps, TOLLGATE_PARTITION=str(partitions))


def test_nats_cluster_has_as_many_nodes_as_stream_replicas(docs: list[dict[str, Any]]) -> None:
    nats = by_kind(docs, "StatefulSet")["nats"]
    replicas = int(by_kind(docs, "ConfigMap")["tollgate-env"]["data"]["TOLLGATE_STREAM_REPLICAS"])
    assert nats["spec"]["replicas"] == replicas == 3
    headless = by_kind(docs, "Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    routes = re.findall(r"nats-route://([\w.-]+):6222", (DEPLOY / "nats/cluster.conf").read_text())
    assert routes == [f"nats-{i}.{headless['metadata']['name']}" for i in range(replicas)]


def test_containers_have_probes_limits_and_a_locked_down_context(
    docs: list[dict[str, Any]],
) -> None:
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c, f"{where}: no liveness probe"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            if w["kind"] != "DaemonSet":
                assert pod["securityContext"]["runAsNonRoot"] is True, where
                assert "add" not in security["capabilities"], where
    api = tollgate_containers(docs)["api"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_kubernetes_runs_the_services_as_the_images_user(docs: list[dict[str, Any]]) -> None:
    uid = int(re.search(r"^USER (\d+)", dockerfile_text(), re.M)[1])  # type: ignore[index]
    for w in workloads(docs):
        if any(c.get("args", [None])[0] in ("ledger", "policy", "api") for c in containers(w)):
            assert w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# --- NATS configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "auth", "env"),
    [("nats.conf", "auth/auth.conf", {}), ("cluster.conf", "auth.conf", {"SERVER_NAME": "nats-0"})],
)
def test_nats_configs_pass_the_servers_own_check(
    tmp_path: Path, conf: str, auth: str, env: dict[str, str]
) -> None:
    shutil.copy(DEPLOY / "nats" / conf, tmp_path / conf)
    stub_auth(tmp_path / auth)
    checked = nats_check(tmp_path / conf, **env)
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_cluster_config_with_generated_auth_and_the_placeholder_secret(tmp_path: Path) -> None:
    nats_config(tmp_path / "gen", "--host", "node-1", "--integrator", "jupyterhub")
    shutil.copy(DEPLOY / "nats" / "cluster.conf", tmp_path / "cluster.conf")
    shutil.copy(tmp_path / "gen" / "auth.conf", tmp_path / "auth.conf")
    checked = nats_check(tmp_path / "cluster.conf", SERVER_NAME="nats-1")
    assert checked.returncode == 0, checked.stderr + checked.stdout
    example = [d for d in yaml.safe_load_all((K8S / SECRETS_EXAMPLE).read_text()) if d]
    placeholder = next(d for d in example if d["metadata"]["name"] == "nats-auth")
    (tmp_path / "auth.conf").write_text(placeholder["stringData"]["auth.conf"])
    checked = nats_check(tmp_path / "cluster.conf", SERVER_NAME="nats-1")
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_nats_config_check_fails_without_the_auth_include_and_server_name(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "nats" / "cluster.conf", tmp_path / "cluster.conf")
    missing_auth = nats_check(tmp_path / "cluster.conf", SERVER_NAME="nats-0")
    assert missing_auth.returncode != 0 and "auth.conf" in missing_auth.stderr
    stub_auth(tmp_path / "auth.conf")
    missing_name = nats_check(tmp_path / "cluster.conf")
    assert missing_name.returncode != 0 and "SERVER_NAME" in missing_name.stderr


@pytest.mark.parametrize("conf", ["nats.conf", "cluster.conf"])
def test_nats_fsyncs_every_jetstream_write_and_serves_health_where_probed(conf: str) -> None:
    text = (DEPLOY / "nats" / conf).read_text()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.M)
    assert re.search(r"^http:\s*0\.0\.0\.0:8222\s*$", text, re.M)


# --- Dockerfile --------------------------------------------------------------------------


def dockerfile_text() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def dockerignored(path: str) -> bool:
    patterns = [
        ln.strip().strip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    parts = Path(path.strip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in patterns)


def test_dockerfile_copies_only_files_that_exist_and_reach_the_build_context() -> None:
    copies = [args.split() for word, args in instructions() if word == "COPY"]
    sources = [s for args in copies if not args[0].startswith("--from") for s in args[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    # Everything setuptools packages is copied, or the installed image misses modules.
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[(.*?)\]", pyproject)[1]  # type: ignore[index]
    for package in re.findall(r'"(\w+)\*"', include):
        assert f"{package}/" in sources, f"the image does not COPY {package}/"
    assert dockerignored("tests") and dockerignored(".venv") and dockerignored("deploy/.env")


def test_dockerfile_installs_the_meters_tools_and_enters_through_tollgate() -> None:
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert re.search(r"apt-get install [^&]*\biptables\b[^&]*\biproute2\b", runs)
    assert ("ENTRYPOINT", '["tollgate"]') in instructions()
    assert re.search(r"^USER 10001", dockerfile_text(), re.M)
    assert "[dev]" not in dockerfile_text()


def test_the_image_compiles_the_meters_bpf_object_as_make_does() -> None:
    """The image's meter counts cgroups by eBPF, not by the iptables fallback."""
    recipe = re.search(r"^\t(clang .*) -c \$< -o \$@$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile no longer compiles the BPF object with clang"
    flags = recipe[1].replace("$$", "$")
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    compiled = re.search(r"(clang [^&]*?) \\?\s*-c (\S+) -o (\S+)", runs)
    assert compiled, "the Dockerfile does not compile the BPF object"
    assert " ".join(compiled[1].split()) == " ".join(flags.split())
    assert (compiled[2], compiled[3]) == (
        "services/meter/bpf/cgroup_net.bpf.c",
        "services/meter/bpf/cgroup_net.bpf.o",
    )
    assert re.search(r"apt-get install [^&]*\blibbpf1\b", runs), "no libbpf1 at run time"
    packaged = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "bpf/*.bpf.o" in packaged["package-data"]["services.meter"]


@pytest.mark.parametrize("extras", ["", "gpu"])
def test_dockerfile_requirements_step_yields_the_projects_dependencies(
    tmp_path: Path, extras: str
) -> None:
    """The image's dependency layer, run as the Dockerfile runs it, on the real pyproject."""
    script = re.search(r"python -c '([^']+)' > /tmp/requirements.txt", dockerfile_text())
    assert script, "the Dockerfile no longer writes /tmp/requirements.txt with python -c"
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script[1]],
        cwd=tmp_path,
        env={**os.environ, "EXTRAS": extras},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + (
        project["optional-dependencies"][extras] if extras else []
    )
    assert done.stdout.split("\n")[:-1] == expected
