"""The deployment files in deploy/: they parse, agree with each other and with the repo, and their
command lines parse with their own parsers: the plain master's with the ``envelope`` CLI's, and the
Locust command lines (the workers', the operator's, and the one ``envelope run`` starts for the
plain master) with Locust's own plus our options.

Locust is only ever imported in a subprocess (it monkey-patches the standard library);
``envelope.cli`` imports neither Locust nor gevent (checked below), so it is imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from envelope import cli
from envelope.scenario import load_scenario

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PLAIN = K8S / "plain"
OPERATOR = K8S / "operator"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
DOC = REPO / "docs" / "distributed.md"

API_KEY_ENV = "ENVELOPE_API_KEY"
# The plain master's container runs `envelope run`; the workers' runs the image's entrypoint (locust).
MASTER_CONTAINER = "envelope"
WORKER_CONTAINER = "locust"
# Manifests applied on their own, not through their folder's kustomization.
STANDALONE = {OPERATOR / "results-pod.yaml"}

# The kinds these manifests use and the API version of each (LocustTest: the operator's v2 API,
# AbdelrhmanHamouda/locust-k8s-operator api/v2/groupversion_info.go: group locust.io, version v2).
API_VERSIONS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Service": "v1",
    "Job": "batch/v1",
    "Deployment": "apps/v1",
    "PersistentVolumeClaim": "v1",
    "Pod": "v1",
    "LocustTest": "locust.io/v2",
}

# LocustTest v2 fields, from the operator's api/v2/locusttest_types.go (docs/api_reference.md).
LOCUSTTEST_SPEC_FIELDS = {"image", "imagePullPolicy", "imagePullSecrets", "master", "worker", "testFiles",
                          "scheduling", "env", "volumes", "volumeMounts", "security", "observability"}
LOCUSTTEST_MASTER_FIELDS = {"command", "resources", "labels", "annotations", "autostart", "autoquit", "extraArgs"}
LOCUSTTEST_WORKER_FIELDS = {"command", "replicas", "resources", "labels", "annotations", "extraArgs"}
LOCUSTTEST_TESTFILES_FIELDS = {"configMapRef", "libConfigMapRef", "srcMountPath", "libMountPath"}
LOCUSTTEST_ENV_FIELDS = {"configMapRefs", "secretRefs", "variables", "secretMounts"}
LOCUSTTEST_VOLUMEMOUNT_FIELDS = {"name", "mountPath", "subPath", "readOnly", "mountPropagation",
                                 "subPathExpr", "recursiveReadOnly", "target"}
OPERATOR_MASTER_PORT = 5557  # internal/resources/constants.go MasterPort
OPERATOR_SRC_MOUNT = "/lotest/src"  # DefaultMountPath
OPERATOR_LIB_MOUNT = "/opt/locust/lib"  # LibMountPath

# The options that decide what each stage sends. A worker runs the master's (locustfiles/context.py
# adopt_master_options), so the manifests give workers none of them.
SCENARIO_OPTIONS = ("scenario", "quick", "duration_scale", "manual", "model", "record_text")
# Our locustfile with no option of its own: the defaults a worker's options are compared with.
BARE_ARGV = ["-f", "locustfiles/llm.py"]


# -- reading the files -------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def docs_of(folder: Path) -> list[dict]:
    return [doc for path in sorted(folder.glob("*.yaml")) if path.name != "kustomization.yaml"
            and path not in STANDALONE for doc in documents(path)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kustomization(folder: Path) -> dict:
    return documents(folder / "kustomization.yaml")[0]


def generated_files(folder: Path, configmap: str) -> dict[str, Path]:
    """key -> repo file of one configMapGenerator entry."""
    (gen,) = [g for g in kustomization(folder).get("configMapGenerator", []) if g["name"] == configmap]
    files = {}
    for entry in gen["files"]:
        key, _, source = entry.partition("=")
        if not source:
            key, source = Path(entry).name, entry
        files[key] = (folder / source).resolve()
    return files


def container(pod_spec: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def substitute(args: list[str], env_names: set[str]) -> list[str]:
    """Kubernetes' $(VAR) expansion: each variable must be defined in the container's env."""
    def one_var(match: re.Match) -> str:
        assert match.group(1) in env_names, f"$({match.group(1)}) is not defined in the container's env"
        return f"<{match.group(1)}>"
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one_var, a) for a in args]


def operator_master_argv(spec: dict) -> list[str]:
    """The master's arguments as the operator builds them (internal/resources/command.go BuildMasterCommand)."""
    master = spec["master"]
    argv = master["command"].split() + ["--master", f"--master-port={OPERATOR_MASTER_PORT}",
                                        f"--expect-workers={spec['worker']['replicas']}"]
    if master.get("autostart", True):
        argv.append("--autostart")
    autoquit = master.get("autoquit") or {}
    if autoquit.get("enabled", True):
        argv += ["--autoquit", str(autoquit.get("timeout", 60))]
    return argv + ["--enable-rebalancing", "--only-summary"] + master.get("extraArgs", [])


def operator_worker_argv(spec: dict, name: str) -> list[str]:
    """BuildWorkerCommand: the seed, then --worker and the master Service generated from the CR name."""
    worker = spec["worker"]
    master_host = f"{name}-master".replace(".", "-")  # api/v2/naming.go GeneratedNodeName
    return worker["command"].split() + ["--worker", f"--master-port={OPERATOR_MASTER_PORT}",
                                        f"--master-host={master_host}"] + worker.get("extraArgs", [])


_PARSE = r"""
import contextlib, io, json, sys
from locust import argument_parser
import locustfiles.llm  # registers our options (_add_arguments) on init_command_line_parser
parser = argument_parser.get_parser(default_config_files=[])
out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out.append(vars(parser.parse_args(argv)))
    except SystemExit:
        out.append({"__error__": err.getvalue().strip().splitlines()[-1]})
print(json.dumps(out, default=str))
"""


def parse_with_locust(argvs: list[list[str]]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "ENVELOPE_"))}
    proc = subprocess.run([sys.executable, "-c", _PARSE], input=json.dumps(argvs), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    for argv, ns in zip(argvs, parsed):
        assert "__error__" not in ns, f"{argv}: {ns.get('__error__')}"
    return parsed


# -- the commands, parsed once for the module --------------------------------------------------

def plain_commands() -> dict[str, tuple[dict, list[str]]]:
    """role -> (container, args): the master's args are `envelope`'s, the worker's Locust's."""
    docs = docs_of(PLAIN)
    master_job, workers = one(docs, "Job", "envelope-master"), one(docs, "Deployment", "envelope-worker")
    out = {}
    for role, obj, name in (("master", master_job, MASTER_CONTAINER), ("worker", workers, WORKER_CONTAINER)):
        c = container(obj["spec"]["template"]["spec"], name)
        out[role] = (c, substitute(c["args"], {e["name"] for e in c.get("env", [])}))
    assert out["master"][0]["command"] == ["envelope"], "the master runs the envelope CLI, not the entrypoint"
    assert "command" not in out["worker"][0], "a worker uses the image's entrypoint (locust)"
    return out


def parse_with_envelope(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``envelope`` parses it (its own parser; no validation, which would probe the server)."""
    try:
        return cli._parser().parse_args(argv)
    except cli.UsageError as exc:
        pytest.fail(f"envelope {' '.join(argv)}: {exc}")


def plain_master_locust_argv(ns: argparse.Namespace) -> list[str]:
    """The Locust command ``envelope run`` starts for these options (less ``python -m locust``).

    The run directory is named as ``envelope run`` names it, after the scenario file the ConfigMap
    key comes from; the locustfile is the installed package's, found at run time.
    """
    files = generated_files(PLAIN, "envelope-scenarios")
    assert Path(ns.scenario).name in files, f"--scenario={ns.scenario}: not a file of the ConfigMap"
    scenario = files[Path(ns.scenario).name]
    run_dir = Path(ns.out) / cli.run_dir_name(load_scenario(scenario).name, 0.0)
    argv = cli.locust_command(
        locustfile=Path("locustfiles/llm.py"), scenario=Path(ns.scenario), host=ns.host, run_dir=run_dir,
        quick=ns.quick, duration_scale=ns.duration_scale, processes=ns.processes,
        expect_workers=ns.expect_workers, master_bind_host=ns.master_bind_host,
        master_bind_port=ns.master_bind_port, model=ns.model, record_text=ns.record_text)
    assert argv[1:3] == ["-m", "locust"], argv
    return argv[3:]


def operator_commands() -> dict[str, list[str]]:
    test = one(docs_of(OPERATOR), "LocustTest")
    spec, name = test["spec"], test["metadata"]["name"]
    env_names = {v["name"] for v in spec.get("env", {}).get("variables", [])}
    for role in ("master", "worker"):
        assert '"' not in spec[role]["command"] and "'" not in spec[role]["command"], \
            "the operator splits commands on spaces: quotes would reach Locust verbatim"
    return {"master": substitute(operator_master_argv(spec), env_names),
            "worker": substitute(operator_worker_argv(spec, name), env_names)}


@pytest.fixture(scope="module")
def plain_master() -> argparse.Namespace:
    """The plain master's `envelope` arguments, parsed by the CLI."""
    return parse_with_envelope(plain_commands()["master"][1])


@pytest.fixture(scope="module")
def parsed(plain_master) -> dict[str, dict]:
    """Locust's options for each Locust command line; plain-master: the one `envelope run` starts."""
    plain, op = plain_commands(), operator_commands()
    keys = ["plain-master", "plain-worker", "operator-master", "operator-worker", "bare"]
    argvs = [plain_master_locust_argv(plain_master), plain["worker"][1], op["master"], op["worker"], BARE_ARGV]
    return dict(zip(keys, parse_with_locust(argvs)))


# -- every file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_parses_with_a_known_kind_and_api_version(path):
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{path}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{path}: {kind} must be {API_VERSIONS[kind]}"
        if kind != "Kustomization":
            assert doc["metadata"]["name"]


def test_each_kustomization_lists_every_manifest_of_its_folder():
    for folder in (PLAIN, OPERATOR):
        listed = {(folder / r).resolve() for r in kustomization(folder)["resources"]}
        on_disk = {p.resolve() for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"} - STANDALONE
        assert listed == on_disk, folder


def test_the_kinds_used():
    kinds = {d["kind"] for p in manifest_files() for d in documents(p)}
    assert kinds == set(API_VERSIONS)


# -- the ConfigMap of scenarios --------------------------------------------------------------------

@pytest.mark.parametrize("folder", [PLAIN, OPERATOR], ids=["plain", "operator"])
def test_configmap_generator_takes_existing_valid_scenarios(folder):
    files = generated_files(folder, "envelope-scenarios")
    assert "capstone.yaml" in files
    for key, source in files.items():
        assert "/" not in key, "ConfigMap keys cannot contain '/'"
        assert source.is_file(), f"{source} does not exist"
        assert source.parent == REPO / "scenarios"
        assert load_scenario(source).name == Path(key).stem
    # The code stays in the image (see docs/distributed.md): no Python in the ConfigMap,
    # and the image copies the locustfiles package the commands name.
    assert not [k for k in files if k.endswith(".py")]
    assert "locustfiles/" in dockerfile_copies()


def test_plain_master_scenario_mount_and_configmap_agree(plain_master):
    files = generated_files(PLAIN, "envelope-scenarios")
    pod = one(docs_of(PLAIN), "Job")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(pod, MASTER_CONTAINER)["volumeMounts"]}
    scenario = Path(plain_master.scenario)
    volume = volumes[mounts[str(scenario.parent)]]
    assert volume["configMap"]["name"] == "envelope-scenarios"
    assert scenario.name in files


def test_operator_scenario_mount_and_configmap_agree(parsed):
    spec = one(docs_of(OPERATOR), "LocustTest")["spec"]
    files = generated_files(OPERATOR, spec["testFiles"]["configMapRef"])
    gen = [g for g in kustomization(OPERATOR)["configMapGenerator"] if g["name"] == spec["testFiles"]["configMapRef"]]
    # kustomize cannot rename a ConfigMap inside a custom resource: the generated name must be the plain one
    assert gen[0]["options"]["disableNameSuffixHash"] is True
    mount = spec["testFiles"].get("srcMountPath", OPERATOR_SRC_MOUNT)
    scenario = Path(parsed["operator-master"]["scenario"])
    assert str(scenario.parent) == mount and scenario.name in files


# -- the command lines, parsed by Locust ---------------------------------------------------------

def test_locustfile_is_the_image_path_of_ours(parsed):
    for key, ns in parsed.items():
        if key != "plain-master":  # `envelope run` finds the installed package's llm.py itself
            assert ns["locustfile"] == "locustfiles/llm.py", key
    assert (REPO / "locustfiles" / "llm.py").is_file()
    assert dockerfile_instructions("WORKDIR")[-1] == "/envelope"


def test_the_envelope_cli_imports_no_locust_or_gevent():
    # this module imports envelope.cli: it must not monkey-patch the test process
    code = ("import sys, envelope.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'locust', 'gevent', 'geventhttpclient'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_plain_master_runs_envelope_for_every_worker(plain_master):
    ns = plain_master
    workers = one(docs_of(PLAIN), "Deployment", "envelope-worker")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["envelope"] == "envelope.cli:main", "the command the master's container runs"
    assert ns.command == "run"
    assert ns.expect_workers == workers["spec"]["replicas"] and ns.processes is None
    assert ns.host.startswith(("http://", "https://")) and ns.profile is None, "a server, never launched here"
    assert ns.master_bind_host == "0.0.0.0", "workers come in through the Service, on the pod's interface"
    assert not ns.no_analysis, "the report is written at the end of the run"
    assert not ns.quick and ns.duration_scale is None, "the scenario as written"
    job = one(docs_of(PLAIN), "Job", "envelope-master")
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(pod, MASTER_CONTAINER)["volumeMounts"]}
    assert mounts.get(ns.out) == "runs", "the run directory goes on the runs volume"
    assert mounts.get(str(Path(ns.scenario).parent)) == "scenarios"
    # the results container sees the same run directories
    assert {m["mountPath"]: m["name"] for m in container(pod, "results")["volumeMounts"]}[ns.out] == "runs"
    # a Job that never retries: a rerun would start a new test against the server
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0


def test_plain_master_starts_locust_as_the_headless_master(parsed, plain_master):
    ns = parsed["plain-master"]
    workers = one(docs_of(PLAIN), "Deployment", "envelope-worker")
    assert ns["master"] and ns["headless"] and not ns["worker"]
    assert ns["expect_workers"] == workers["spec"]["replicas"] and ns["expect_workers_max_wait"] > 0
    assert ns["master_bind_host"] == "0.0.0.0"
    assert ns["scenario"] == plain_master.scenario and ns["host"] == plain_master.host
    run_dir = Path(ns["run_dir"])
    assert run_dir.parent == Path(plain_master.out)
    # Locust's own CSV and HTML go into the run directory, written by `envelope run`'s Locust
    assert Path(ns["csv_prefix"]).parent == run_dir / "locust"
    assert Path(ns["html_file"]).parent == run_dir / "locust"


def test_plain_workers_connect_to_the_master_service(parsed):
    docs = docs_of(PLAIN)
    ns, master = parsed["plain-worker"], parsed["plain-master"]
    service = one(docs, "Service", "envelope-master")
    job = one(docs, "Job", "envelope-master")
    assert ns["worker"] and not ns["master"]
    assert ns["master_host"] == service["metadata"]["name"]
    port = [p for p in service["spec"]["ports"] if p["port"] == ns["master_port"]]
    assert port and port[0]["targetPort"] == master["master_bind_port"]
    # the master's pod listens there; there is no web UI (`envelope run` is headless)
    master_pod = job["spec"]["template"]["spec"]
    assert {p["containerPort"] for p in container(master_pod, MASTER_CONTAINER)["ports"]} == {port[0]["targetPort"]}
    assert {p["port"] for p in service["spec"]["ports"]} == {5557}
    # the Service selects the master's pod, not the workers'
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    worker_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items()


def test_operator_master_and_workers(parsed):
    test = one(docs_of(OPERATOR), "LocustTest")
    spec = test["spec"]
    master, worker = parsed["operator-master"], parsed["operator-worker"]
    assert master["master"] and master["autostart"] and not master["headless"]
    assert master["expect_workers"] == spec["worker"]["replicas"] and master["expect_workers_max_wait"] > 0
    assert master["autoquit"] >= 60, "time to look at the LLM tab before the master quits"
    assert worker["worker"] and worker["master_host"] == f"{test['metadata']['name']}-master"
    assert worker["master_port"] == master["master_bind_port"] == OPERATOR_MASTER_PORT
    run_dir = Path(master["run_dir"])
    assert "<ENVELOPE_RUN_ID>" in master["run_dir"]
    assert Path(master["csv_prefix"]).parent == run_dir / "locust"
    runs = [m for m in spec["volumeMounts"] if m["mountPath"] == str(run_dir.parent)]
    assert runs and runs[0]["target"] == "master", "only the master writes a run directory"
    volume = [v for v in spec["volumes"] if v["name"] == runs[0]["name"]][0]
    claim = one(docs_of(OPERATOR), "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # workers spread over nodes: the selector names the operator's label for worker pods
    term = spec["scheduling"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == {
        "performance-test-pod-name": f"{test['metadata']['name']}-worker"}
    results = one(documents(OPERATOR / "results-pod.yaml"), "Pod")
    assert [v["persistentVolumeClaim"]["claimName"] for v in results["spec"]["volumes"]] == [claim["metadata"]["name"]]


@pytest.mark.parametrize("variant", ["plain", "operator"])
def test_workers_carry_no_scenario_option_and_the_master_does(parsed, variant):
    master, worker, bare = parsed[f"{variant}-master"], parsed[f"{variant}-worker"], parsed["bare"]
    # a worker runs the master's scenario and options: any given to it would only mislead a reader
    for option in SCENARIO_OPTIONS:
        assert worker[option] == bare[option], option
    assert master["scenario"] and master["scenario"] != bare["scenario"]
    assert not worker["host"], "the master sends its --host with each spawn message"


def test_plain_workers_mount_nothing_and_the_master_mounts_the_scenarios():
    docs = docs_of(PLAIN)
    worker_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert not worker_pod.get("volumes"), "no scenarios and no run directory on a worker"
    assert not container(worker_pod, WORKER_CONTAINER).get("volumeMounts")
    master_pod = one(docs, "Job")["spec"]["template"]["spec"]
    configmaps = [v["configMap"]["name"] for v in master_pod["volumes"] if "configMap" in v]
    assert configmaps == ["envelope-scenarios"]


def test_operator_workers_mount_no_volume_of_ours():
    spec = one(docs_of(OPERATOR), "LocustTest")["spec"]
    # testFiles is mounted on both by the operator (harmless); our own volumes go to the master only
    assert spec["volumeMounts"] and all(m["target"] == "master" for m in spec["volumeMounts"])


def test_locusttest_uses_documented_fields_and_passes_the_webhook_rules():
    test = one(docs_of(OPERATOR), "LocustTest")
    spec, name = test["spec"], test["metadata"]["name"]
    assert set(spec) <= LOCUSTTEST_SPEC_FIELDS
    assert {"image", "master", "worker"} <= set(spec)
    assert set(spec["master"]) <= LOCUSTTEST_MASTER_FIELDS and spec["master"]["command"]
    assert set(spec["worker"]) <= LOCUSTTEST_WORKER_FIELDS and spec["worker"]["command"]
    assert 1 <= spec["worker"]["replicas"] <= 500
    assert set(spec["testFiles"]) <= LOCUSTTEST_TESTFILES_FIELDS
    assert set(spec["env"]) <= LOCUSTTEST_ENV_FIELDS
    assert set(spec["master"].get("autoquit", {})) <= {"enabled", "timeout"}
    # api/v2/locusttest_webhook.go: name length, volume names, mount paths
    assert len(name) <= 56
    generated = {f"{name}-master", f"{name}-worker", "locust-lib"}
    for volume in spec.get("volumes", []):
        assert not volume["name"].startswith("secret-") and volume["name"] not in generated
    volume_names = {v["name"] for v in spec.get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        assert set(mount) <= LOCUSTTEST_VOLUMEMOUNT_FIELDS
        assert mount["name"] in volume_names
        assert mount.get("target", "both") in {"master", "worker", "both"}
        for reserved in (OPERATOR_SRC_MOUNT, OPERATOR_LIB_MOUNT):
            path = mount["mountPath"].rstrip("/")
            assert not (path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"))


def test_resources_request_a_core_and_set_no_cpu_limit():
    resources = [container(one(docs_of(PLAIN), kind)["spec"]["template"]["spec"], name)["resources"]
                 for kind, name in (("Job", MASTER_CONTAINER), ("Deployment", WORKER_CONTAINER))]
    spec = one(docs_of(OPERATOR), "LocustTest")["spec"]
    resources += [spec["master"]["resources"], spec["worker"]["resources"]]
    for r in resources:
        assert str(r["requests"]["cpu"]) == "1"
        assert "cpu" not in r.get("limits", {})


# -- the API key ---------------------------------------------------------------------------------

def _api_key_env_entries() -> list[tuple[str, list[dict]]]:
    """(where, env list) of every container that runs Locust or envelope, and of the LocustTest."""
    out = []
    for kind, name in (("Job", MASTER_CONTAINER), ("Deployment", WORKER_CONTAINER)):
        pod = one(docs_of(PLAIN), kind)["spec"]["template"]["spec"]
        out.append((f"plain {kind}", container(pod, name).get("env", [])))
    out.append(("LocustTest", one(docs_of(OPERATOR), "LocustTest")["spec"]["env"]["variables"]))
    return out


def test_api_key_comes_from_a_secret_through_envelope_api_key(parsed, plain_master):
    for where, env in _api_key_env_entries():
        entries = [e for e in env if e["name"] == API_KEY_ENV]
        assert len(entries) == 1, f"{where}: the master probes and the workers send, both need the key"
        (entry,) = entries
        assert "value" not in entry
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "envelope-api-key" and ref["key"]
    for ns in parsed.values():
        assert ns["api_key_env"] in ("", API_KEY_ENV) and not ns["api_key_file"]
    # envelope reads ENVELOPE_API_KEY by default and hands it to Locust in the environment only
    assert plain_master.api_key_env in (None, API_KEY_ENV) and not plain_master.api_key_file


def test_no_secret_in_any_deployment_file():
    for path in [*manifest_files(), DOCKERFILE, DOCKERIGNORE]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"--api-key(?![-_](env|file))", text), f"{path}: an API key flag"
        assert not re.search(r"\bsk-[A-Za-z0-9]{8,}", text), f"{path}: something that looks like a key"
        if path.suffix == ".yaml":
            for doc in documents(path):
                assert doc["kind"] != "Secret", f"{path}: create the Secret yourself, outside the repo"
                assert "secretGenerator" not in doc
    for instruction in ("ENV", "ARG"):
        for value in dockerfile_instructions(instruction):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", value, re.I), value


# -- the image -----------------------------------------------------------------------------------

def dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    out = []
    for entry in logical:
        word, _, rest = entry.partition(" ")
        if word.upper() == name:
            out.append(rest.strip())
    return out


def dockerfile_copies() -> list[str]:
    sources = []
    for args in dockerfile_instructions("COPY"):
        parts = args.split()
        sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def test_image_base_user_and_entrypoint():
    assert dockerfile_instructions("FROM") == ["python:3.11-slim"]
    assert json.loads(dockerfile_instructions("ENTRYPOINT")[-1]) == ["locust"]
    user = dockerfile_instructions("USER")[-1]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user, checkable by runAsNonRoot"
    pods = [one(docs_of(PLAIN), kind)["spec"]["template"]["spec"] for kind in ("Job", "Deployment")]
    pods.append(one(documents(OPERATOR / "results-pod.yaml"), "Pod")["spec"])
    contexts = [p["securityContext"] for p in pods]
    contexts.append(one(docs_of(OPERATOR), "LocustTest")["spec"]["security"]["podSecurityContext"])
    for ctx in contexts:
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == int(user)


def test_image_installs_the_base_dependencies_only():
    runs = " ".join(dockerfile_instructions("RUN"))
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert [i.strip() for i in installs] == ["."], installs
    assert not re.search(r"\[(cpu|gpu)|vllm|torch", runs, re.I)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if re.match(r"(vllm|torch)", d, re.I)]
    assert any(re.match(r"vllm", d) for d in project["optional-dependencies"]["cpu"]), \
        "the cpu extra is what pulls vLLM (so leaving it out keeps it out)"


def test_image_copies_every_package_and_what_the_build_needs():
    copies = dockerfile_copies()
    for source in copies:
        assert (REPO / source).exists(), source
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    assert {f"{p}/" for p in packages} <= set(copies)
    assert {"pyproject.toml", "README.md", "scenarios/"} <= set(copies)
    ignore = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "*"
    for source in copies:  # everything else is left out of the build context
        assert f"!{source}" in ignore, source


# -- kustomize, when kubectl is here ---------------------------------------------------------------

@pytest.mark.parametrize("folder", [PLAIN, OPERATOR], ids=["plain", "operator"])
def test_kustomize_renders_the_repo_scenarios(folder):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` not checked")
    proc = subprocess.run([kubectl, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(folder)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (configmap,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    files = generated_files(folder, "envelope-scenarios")
    assert configmap["data"] == {k: p.read_text(encoding="utf-8") for k, p in files.items()}
    name = configmap["metadata"]["name"]
    if folder == PLAIN:  # kustomize renamed it (hash suffix) and followed the rename in the pods
        assert name.startswith("envelope-scenarios-")
        for d in rendered:
            if d["kind"] in ("Job", "Deployment"):
                volumes = d["spec"]["template"]["spec"].get("volumes", [])
                refs = [v["configMap"]["name"] for v in volumes if "configMap" in v]
                assert refs == ([name] if d["kind"] == "Job" else [])
                images = {c["image"] for c in d["spec"]["template"]["spec"]["containers"]}
                assert images == {"envelope-loadgen:0.1.0"}
    else:
        (test,) = [d for d in rendered if d["kind"] == "LocustTest"]
        assert test["spec"]["testFiles"]["configMapRef"] == name == "envelope-scenarios"


# -- the guide -------------------------------------------------------------------------------------

def test_the_guide_names_files_that_exist():
    text = DOC.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w/])(deploy/[\w./-]+|scenarios/[\w.-]+\.yaml|locustfiles/[\w.]+\.py)", text))
    assert "deploy/Dockerfile" in paths
    assert f"apiVersion: {API_VERSIONS['LocustTest']}" in text
    for p in paths:
        assert (REPO / p.rstrip(".")).exists(), p
