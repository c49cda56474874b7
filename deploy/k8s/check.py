#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster (`make deploy-check`).

1. Every overlay (and deploy/k8s/strimzi) renders with `kubectl kustomize`.
2. Every built-in resource is valid for Kubernetes 1.37 (kubernetes-validate,
   strict: unknown fields are errors).
3. Every KEDA, Strimzi and Prometheus-operator resource is valid against the
   published CRD schema kept in deploy/k8s/schemas (unknown fields are errors
   there too), and those files still have the SHA-256 SOURCES.md records.
4. Every environment variable and flag a container sets exists in the
   `--help` of the binary it runs; every ConfigMap a container takes its
   whole environment from holds only such variables.
5. KEDA never scales a consumer past its topic's partition count in that
   overlay's topic layout, and watches the topic and group the service uses.
6. The copies of deploy/*.toml under base/config equal their sources, and
   strimzi/kafkatopics.yaml equals what `flywheel topics strimzi` prints now.
7. Every metric an alert rule or a dashboard panel names is registered by a
   service: the names come from the `register(...)` calls in services/*/src
   (with the sub-registry prefix and the suffixes of the metric's type), so a
   renamed or misspelt metric fails here.

Run from the repository root with the virtual environment's Python after
`cargo build --workspace --bins` (the binaries' --help is read from
target/debug). Prints one line per check and exits non-zero on any failure.
"""

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["dev", "prod", "prod-gpu"]
KUBERNETES_VERSION = "1.37.0"
KUBECTL = Path(sys.executable).parent / "kubectl"
BINARIES = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
CRD_GROUPS = {"keda.sh", "kafka.strimzi.io", "monitoring.coreos.com"}
# Variables a container may get from a Secret it names whole: the object_store
# crate's credentials (AWS_*, GOOGLE_*, AZURE_*), documented in the README.
SECRET_ENV_SOURCES = {"flywheel-object-store"}

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAIL {message}")


def run(args: list[str], **kwargs) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60, **kwargs).stdout


def render(path: Path) -> list[dict]:
    out = run([str(KUBECTL), "kustomize", str(path)])
    return [d for d in yaml.safe_load_all(out) if d]


def group_of(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def name_of(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --- CRD schemas -------------------------------------------------------------


def load_crds() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> JSON schema, from the vendored CRDs."""
    sources = (K8S / "schemas" / "SOURCES.md").read_text()
    recorded = dict(re.findall(r"`(crds/[^`]+)` \|[^\n]*\| ([0-9a-f]{64}) \|", sources))
    schemas = {}
    for path in sorted((K8S / "schemas" / "crds").glob("*.yaml")):
        rel = f"crds/{path.name}"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if recorded.get(rel) != digest:
            fail(f"{rel}: SHA-256 {digest} is not the one SOURCES.md records ({recorded.get(rel)})")
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                schemas[(group, version["name"], kind)] = schema
    return schemas


def strict_schema(node):
    """An OpenAPI v3 structural schema as a JSON schema that rejects what the
    API server would silently prune (undeclared fields)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: strict_schema(v) for k, v in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["anyOf"] = node.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    return node


def check_custom(doc: dict, crds: dict) -> None:
    group, version = doc["apiVersion"].split("/")
    schema = crds.get((group, version, doc["kind"]))
    if schema is None:
        fail(f"{name_of(doc)}: no vendored CRD serves {doc['apiVersion']} {doc['kind']}")
        return
    body = copy.deepcopy(doc)
    meta = body.get("metadata", {})
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta.get("name", "")) or len(meta["name"]) > 253:
        fail(f"{name_of(doc)}: metadata.name is not a valid resource name")
    for error in jsonschema.Draft7Validator(schema).iter_errors(body):
        where = "/".join(str(p) for p in error.absolute_path)
        fail(f"{name_of(doc)}: {where}: {error.message}")


# --- binaries' --help --------------------------------------------------------

_help_cache: dict[tuple[str, ...], tuple[set[str], set[str]]] = {}


def help_of(binary: str, subcommand: tuple[str, ...] = ()) -> tuple[set[str], set[str]]:
    """(environment variables, flags) that `binary [subcommand] --help` lists."""
    key = (binary, *subcommand)
    if key not in _help_cache:
        exe = BINARIES / binary
        if not exe.exists():
            raise SystemExit(f"{exe} is missing: run `cargo build --workspace --bins` first")
        text = run([str(exe), *subcommand, "--help"])
        env = set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", text))
        flags = set(re.findall(r"^\s+(?:-[A-Za-z], )?(--[a-z0-9-]+)", text, re.M))
        _help_cache[key] = (env, flags)
    return _help_cache[key]


def check_container(owner: str, container: dict, configmaps: dict[str, dict]) -> None:
    command = container.get("command", []) + container.get("args", [])
    if not command:
        fail(f"{owner}: container {container['name']} names no command (the image runs `flywheel --help`)")
        return
    binary = os.path.basename(command[0])
    # Words before the first flag are subcommands (`flywheel topics create`).
    words = command[1:]
    sub = tuple(w for w in words[: next((i for i, w in enumerate(words) if w.startswith("-")), len(words))])
    env_known, flags_known = set(), set()
    for depth in range(len(sub) + 1):
        e, f = help_of(binary, sub[:depth])
        env_known |= e
        flags_known |= f
    for word in words:
        if word.startswith("--") and word.split("=")[0] not in flags_known:
            fail(f"{owner}: {binary} has no flag {word.split('=')[0]}")
    for var in container.get("env", []):
        if var["name"] not in env_known:
            fail(f"{owner}: {binary} reads no environment variable {var['name']}")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in configmaps:
                fail(f"{owner}: envFrom names ConfigMap {name}, which the overlay does not render")
                continue
            for key in configmaps[name].get("data", {}):
                if key not in env_known:
                    fail(f"{owner}: {binary} reads no environment variable {key} (from ConfigMap {name})")
        elif source.get("secretRef", {}).get("name") not in SECRET_ENV_SOURCES:
            fail(f"{owner}: whole-Secret environment only from {sorted(SECRET_ENV_SOURCES)}: {source}")


def check_grace(owner: str, pod: dict, configmaps: dict[str, dict]) -> None:
    """A service drains for FLYWHEEL_DRAIN_TIMEOUT_SECS after SIGTERM, then
    waits up to 1 s for busy threads: the pod's grace period must cover both,
    or the kubelet's SIGKILL cuts the drain short."""
    grace = pod.get("terminationGracePeriodSeconds", 30)
    for container in pod.get("containers", []):
        command = container.get("command", []) + container.get("args", [])
        if not command or "FLYWHEEL_DRAIN_TIMEOUT_SECS" not in help_of(os.path.basename(command[0]))[0]:
            continue
        drain = 30  # the binaries' default
        for source in container.get("envFrom", []):
            data = configmaps.get(source.get("configMapRef", {}).get("name"), {}).get("data", {})
            drain = int(data.get("FLYWHEEL_DRAIN_TIMEOUT_SECS", drain))
        for var in container.get("env", []):
            if var["name"] == "FLYWHEEL_DRAIN_TIMEOUT_SECS" and "value" in var:
                drain = int(var["value"])
        if grace < drain + 2:
            fail(
                f"{owner}: terminationGracePeriodSeconds {grace} does not cover the drain timeout "
                f"({drain} s) plus 2 s: raise it or lower FLYWHEEL_DRAIN_TIMEOUT_SECS"
            )


# --- topics ------------------------------------------------------------------


def topic_partitions(topics_toml: str) -> dict[str, tuple[str, int]]:
    """logical topic -> (name on the broker, partitions), as the flywheel CLI
    computes them from a topics file (its built-in defaults included)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(topics_toml)
        f.flush()
        out = run([str(BINARIES / "flywheel"), "--topics-config", f.name, "topics", "strimzi", "--cluster", "x"])
    docs = [d for d in yaml.safe_load_all(out) if d]
    specs = [(d["spec"]["topicName"], d["spec"]["partitions"]) for d in docs]
    prefix = tomllib.loads(topics_toml).get("prefix", "")
    return {name[len(prefix):]: (name, partitions) for name, partitions in specs}


def check_keda(overlay: str, docs: list[dict], configmaps: dict[str, dict]) -> None:
    # Generated ConfigMaps carry kustomize's hash suffix.
    topics_cm = next((cm for n, cm in configmaps.items() if re.fullmatch(r"flywheel-topics(-[a-z0-9]+)?", n)), None)
    if topics_cm is None:
        fail(f"{overlay}: no flywheel-topics ConfigMap")
        return
    layout = topic_partitions(topics_cm["data"]["topics.toml"])
    by_name = {layout[t][0]: (t, layout[t][1]) for t in layout}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        target = deployments.get(so["spec"]["scaleTargetRef"]["name"])
        if target is None:
            fail(f"{overlay}: {name_of(so)} scales a Deployment the overlay does not have")
            continue
        container = target["spec"]["template"]["spec"]["containers"][0]
        group_env = {v["name"]: v.get("value") for v in container.get("env", []) if v["name"].endswith("_GROUP_ID")}
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            topic = meta.get("topic")
            if topic not in by_name:
                fail(f"{overlay}: {name_of(so)} watches topic {topic!r}, not in the layout {sorted(by_name)}")
                continue
            logical, partitions = by_name[topic]
            top = so["spec"].get("maxReplicaCount", 100)
            if top > partitions:
                fail(f"{overlay}: {name_of(so)} may scale to {top} replicas; {topic} has {partitions} partitions")
            if str(meta.get("allowIdleConsumers", "false")).lower() == "true":
                fail(f"{overlay}: {name_of(so)} allows idle consumers (replicas beyond the partitions)")
            if meta.get("consumerGroup") not in group_env.values():
                fail(f"{overlay}: {name_of(so)} watches group {meta.get('consumerGroup')}, "
                     f"the Deployment uses {group_env}")
            print(f"  ok   {overlay}: {name_of(so)} at most {top} replicas for {partitions} partitions of {topic}")


def check_copies() -> None:
    pairs = {
        "base/config/topics.toml": "topics.toml",
        "base/config/trigger-policy.toml": "trigger-policy.toml.example",
        "base/config/release-policy.toml": "release-policy.toml.example",
    }
    for copy_path, source in pairs.items():
        if (K8S / copy_path).read_bytes() != (ROOT / "deploy" / source).read_bytes():
            fail(f"deploy/k8s/{copy_path} differs from deploy/{source}: copy it again")


def check_strimzi_generated() -> None:
    path = K8S / "strimzi" / "kafkatopics.yaml"
    committed = path.read_text()
    first = committed.splitlines()[0]
    match = re.search(r"`flywheel (.*)`", first)
    if not match:
        fail(f"{path}: the first line does not name the command that made it")
        return
    now = run([str(BINARIES / "flywheel"), *match.group(1).split()], cwd=ROOT)
    if now != committed:
        fail(f"{path} differs from `flywheel {match.group(1)}`: run it again")
    else:
        print(f"  ok   strimzi/kafkatopics.yaml equals `flywheel {match.group(1)}`")


# --- metrics -----------------------------------------------------------------

REGISTER = re.compile(r'\.register\(\s*"([a-z_][a-z0-9_]*)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*(.*?)\)\s*;', re.S)
TUPLE = re.compile(r'\(\s*"([a-z_][a-z0-9_]*)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*&self\.([a-z_][a-z0-9_]*)\s*,?\s*\)')


def metric_kind(source: str, field: str) -> str | None:
    """counter, gauge or histogram: from the declared type of `field` (a
    struct field such as `records: Family<ResultLabels, Counter>`)."""
    for match in re.finditer(rf"^\s*(?:pub(?:\([a-z]+\))?\s+)?{field}\s*:\s*(.+?),?\s*$", source, re.M):
        for kind in ("Histogram", "Counter", "Gauge"):
            if kind in match.group(1):
                return kind.lower()
    return None


def samples(name: str, kind: str) -> set[str]:
    return {
        "counter": {f"{name}_total"},
        "gauge": {name},
        "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
    }[kind]


def registered_metrics() -> dict[str, str]:
    """Sample name -> the source file that registers it."""
    core = (ROOT / "services" / "core" / "src" / "kafka.rs").read_text()
    group_watch = [
        (name, metric_kind(core, expr.strip().rstrip(",").split(".")[-2]))
        for name, expr in REGISTER.findall(core)
        if expr.strip().rstrip(",").endswith(".clone()")
    ]
    found: dict[str, str] = {}
    for path in sorted((ROOT / "services").glob("*/src/**/*.rs")):
        if path.parts[-3] == "core":
            continue
        source = path.read_text()
        # Field types may be declared in another file of the crate.
        crate_dir = ROOT / "services" / path.relative_to(ROOT).parts[1]
        crate = "\n".join(p.read_text() for p in sorted(crate_dir.glob("src/**/*.rs")))
        prefixes = set(re.findall(r'sub_registry_with_prefix\("([a-z_]+)"\)', source))
        if not prefixes:
            continue
        if len(prefixes) > 1:
            fail(f"{path.relative_to(ROOT)}: several metric prefixes {prefixes}; the scan expects one per file")
            continue
        (prefix,) = prefixes
        entries = []
        for name, expr in REGISTER.findall(source):
            parts = expr.strip().rstrip(",").strip().split(".")
            if len(parts) >= 2 and parts[-1] == "clone()":
                entries.append((name, parts[-2]))
            # else: a loop variable (the tuples below carry those names)
        entries += TUPLE.findall(source)
        for name, field in entries:
            if field == "family":
                continue
            kind = metric_kind(source, field) or metric_kind(crate, field)
            if kind is None:
                fail(f"{path.relative_to(ROOT)}: cannot tell the type of metric {name} (field {field})")
                continue
            for sample in samples(f"{prefix}_{name}", kind):
                found[sample] = str(path.relative_to(ROOT))
        if "GroupWatch::new(" in source:
            for name, kind in group_watch:
                for sample in samples(f"{prefix}_{name}", kind):
                    found[sample] = "services/core/src/kafka.rs"
    return found


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def check_metrics(docs_by_overlay: dict[str, list[dict]]) -> None:
    registered = registered_metrics()
    if len(registered) < 40:
        fail(f"the register() scan found only {len(registered)} metric samples: the scan is broken")
    exprs: list[tuple[str, str]] = []
    for overlay, docs in docs_by_overlay.items():
        for doc in docs:
            if doc["kind"] == "PrometheusRule":
                for group in doc["spec"]["groups"]:
                    for rule in group["rules"]:
                        exprs.append((f"{overlay} rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    dashboard = json.loads((K8S / "components" / "monitoring" / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    for panel in panels:
        if not panel.get("targets"):
            fail(f"dashboard panel {panel['title']!r} has no query")
        for target in panel.get("targets", []):
            exprs.append((f"dashboard panel {panel['title']!r}", target["expr"]))
    services = {f"flywheel-{n}" for n in ("collector", "rewarder", "lake-writer", "trigger", "trainer", "gate", "console")}
    checked = set()
    for where, expr in exprs:
        for name in metric_names(expr):
            checked.add(name)
            if name == "up":  # Prometheus' own, one per scrape target
                continue
            if name not in registered:
                close = sorted(n for n in registered if n.split("_")[0] == name.split("_")[0])
                fail(f"{where}: no service registers {name} (registered with that prefix: {close})")
        for job in re.findall(r'job\s*=~?\s*"([^"]+)"', expr):
            if not any(re.fullmatch(job, s) for s in services):
                fail(f"{where}: job {job!r} matches no Flywheel service")
    print(f"  ok   {len(exprs)} rule and panel queries read {len(checked)} metrics; "
          f"{len(registered)} samples registered by the services")


# --- main --------------------------------------------------------------------


def main() -> int:
    started = time.monotonic()
    print("deploy-check: rendering overlays")
    crds = load_crds()
    docs_by_overlay = {o: render(K8S / "overlays" / o) for o in OVERLAYS}
    docs_by_overlay["strimzi"] = render(K8S / "strimzi")
    for overlay, docs in docs_by_overlay.items():
        configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        # Names keep kustomize's hash suffix; references in the output use it.
        builtin = custom = 0
        for doc in docs:
            group = group_of(doc)
            if group in CRD_GROUPS:
                check_custom(doc, crds)
                custom += 1
            elif "." in group and not group.endswith(".k8s.io"):
                fail(f"{overlay}: {name_of(doc)}: API group {group} has no vendored schema")
            else:
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{overlay}: {name_of(doc)}: {e.message} at {'/'.join(map(str, e.path))}")
                builtin += 1
            spec = doc.get("spec", {})
            pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec")
            if doc["kind"] in ("Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet") and pod:
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    check_container(f"{overlay}: {name_of(doc)}", container, configmaps)
                if doc["kind"] == "Deployment":
                    check_grace(f"{overlay}: {name_of(doc)}", pod, configmaps)
        if overlay != "strimzi":
            check_keda(overlay, docs, configmaps)
        print(f"  ok   {overlay}: {len(docs)} resources rendered ({builtin} built-in, {custom} custom) and checked")
    check_copies()
    check_strimzi_generated()
    check_metrics(docs_by_overlay)
    took = time.monotonic() - started
    if failures:
        print(f"deploy-check: {len(failures)} failure(s) in {took:.1f} s")
        return 1
    print(f"deploy-check: all checks passed in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
