#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests in deploy/k8s (issue #13); no cluster needed.
#
#   deploy/validate.sh          validate deploy/k8s, then check that broken copies of it fail
#   deploy/validate.sh DIR      validate the manifests in DIR only (exit 1 on any error)
#
# Core objects (Deployment, Service, ConfigMap, PersistentVolumeClaim) are checked against the
# Kubernetes JSON Schemas bundled in the PyPI package kubernetes-validate (strict: unknown fields
# are errors), for Kubernetes $LORAMUX_K8S_VERSION (default 1.30). The Gateway API Inference
# Extension objects (InferencePool, InferenceObjective) are checked against the trimmed CRD
# schemas committed in deploy/schemas/ (see deploy/schemas/README.md), with jsonschema. An object
# of any other kind is an error. Then the objects are checked against each other: selectors
# select the Deployment's pods, ports and references resolve, the liveness probe hits /health and
# the readiness probe /ready (503 until remote startup adapters are loaded), labels agree,
# the ConfigMap's loramux.toml is TOML.
#
# Needs python3 with venv and pip. The packages go into a venv outside the repository
# (${TMPDIR:-/tmp}/loramux-deploy-validate, or $LORAMUX_VALIDATE_VENV), installed from PyPI on
# the first run; validation itself reads no network.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIREMENTS="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4"
VENV="${LORAMUX_VALIDATE_VENV:-${TMPDIR:-/tmp}/loramux-deploy-validate}"
K8S_VERSION="${LORAMUX_K8S_VERSION:-1.30}"

if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "validate: installing $REQUIREMENTS into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS
  echo "$REQUIREMENTS" > "$VENV/.requirements"
fi

exec "$VENV/bin/python" - "$K8S_VERSION" "$@" <<'PY'
import copy
import json
import pathlib
import shutil
import sys
import tempfile

import jsonschema
import yaml
from kubernetes_validate import utils as kv

K8S_VERSION = sys.argv[1]
ROOT = pathlib.Path.cwd()
SCHEMAS = ROOT / "deploy" / "schemas"
CORE = {("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment")}
PART_OF = {"app.kubernetes.io/name": "loramux", "app.kubernetes.io/part-of": "loramux"}
HEALTH = "/health"
READY = "/ready"


def load_gie_schemas():
    """(apiVersion, kind) -> validator, from deploy/schemas/*.json (each checked against its metaschema)."""
    validators = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        validators[key] = (path.name, jsonschema.Draft202012Validator(schema))
    if not validators:
        sys.exit(f"validate: no schemas in {SCHEMAS}")
    return validators


GIE = load_gie_schemas()


def where(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def load_docs(directory, errors):
    """The objects of the kustomization in `directory`, each as (file name, object)."""
    kust_path = directory / "kustomization.yaml"
    if not kust_path.is_file():
        errors.append(f"{kust_path}: missing")
        return []
    kust = yaml.safe_load(kust_path.read_text()) or {}
    if kust.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or kust.get("kind") != "Kustomization":
        errors.append("kustomization.yaml: apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization expected")
    # Resources, and the two transformers that change nothing checked here (image references,
    # the namespace): anything else that makes kustomize rewrite the objects (labels, patches,
    # generators) would make what is checked differ from what is applied.
    extra = set(kust) - {"apiVersion", "kind", "resources", "images", "namespace"}
    if extra:
        errors.append(f"kustomization.yaml: only resources, images and namespace are checked offline; found {sorted(extra)}")
    resources = kust.get("resources") or []
    on_disk = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    if sorted(resources) != on_disk:
        errors.append(f"kustomization.yaml: resources {sorted(resources)} are not the manifests on disk {on_disk}")
    docs = []
    for name in resources:
        path = directory / name
        if not path.is_file():
            errors.append(f"{name}: listed in kustomization.yaml but missing")
            continue
        try:
            found = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            errors.append(f"{name}: not YAML: {e}")
            continue
        for d in found:
            if not isinstance(d, dict) or not isinstance(d.get("apiVersion"), str) or not isinstance(d.get("kind"), str):
                errors.append(f"{name}: an object without apiVersion and kind")
                continue
            docs.append((name, d))
    return docs


def check_schemas(docs, errors):
    for name, d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in GIE:
            schema_name, validator = GIE[key]
            for e in sorted(validator.iter_errors(d), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in e.absolute_path) or "(top)"
                errors.append(f"{name}: {where(d)}: {path}: {e.message} (schema {schema_name})")
        elif key in CORE:
            try:
                kv.validate(copy.deepcopy(d), K8S_VERSION, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                errors.append(f"{name}: {where(d)}: {path}: {e.message} (Kubernetes {e.version}, strict)")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                errors.append(f"{name}: {where(d)}: {e.message}")
        else:
            errors.append(f"{name}: {where(d)}: no schema for {key[0]} {key[1]} (core: {sorted(k for _, k in CORE)}; GIE: {sorted(k for _, k in GIE)})")


def subset(small, big):
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def check_references(docs, errors):
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        meta = d.get("metadata") or {}
        labels = meta.get("labels") or {}
        if not subset(PART_OF, labels):
            errors.append(f"{where(d)}: labels must include {PART_OF}")
    seen = set()
    for _, d in docs:
        k = (d["kind"], (d.get("metadata") or {}).get("name"))
        if k in seen:
            errors.append(f"{where(d)}: defined twice")
        seen.add(k)
    names = {kind: {(d.get("metadata") or {}).get("name") for d in ds} for kind, ds in by_kind.items()}
    deployments = by_kind.get("Deployment", [])
    if not deployments:
        errors.append("no Deployment")

    def pods():
        for dep in deployments:
            tmpl = (dep.get("spec") or {}).get("template") or {}
            yield dep, ((tmpl.get("metadata") or {}).get("labels") or {}), ((tmpl.get("spec") or {}).get("containers") or [])

    def container_ports(containers):
        return {p.get("name"): p.get("containerPort") for c in containers for p in (c.get("ports") or [])}

    for dep, labels, containers in pods():
        sel = (((dep.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
        if not subset(sel, labels):
            errors.append(f"{where(dep)}: spec.selector.matchLabels {sel} do not select its pod template labels {labels}")
        if not subset(PART_OF, labels):
            errors.append(f"{where(dep)}: pod template labels must include {PART_OF}")
        ports = container_ports(containers)
        spec = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in containers:
            for probe, path in (("readinessProbe", READY), ("livenessProbe", HEALTH)):
                get = ((c.get(probe) or {}).get("httpGet")) or {}
                port = get.get("port")
                port = ports.get(port, port) if isinstance(port, str) else port
                if get.get("path") != path or port not in ports.values():
                    errors.append(f"{where(dep)}: container {c.get('name')}: {probe} must be an httpGet of {path} on a container port")
        for v in spec.get("volumes") or []:
            cm = (v.get("configMap") or {}).get("name")
            if cm is not None and cm not in names.get("ConfigMap", set()):
                errors.append(f"{where(dep)}: volume {v.get('name')} names ConfigMap {cm}, which is not defined")
            pvc = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if pvc is not None and pvc not in names.get("PersistentVolumeClaim", set()):
                errors.append(f"{where(dep)}: volume {v.get('name')} names PersistentVolumeClaim {pvc}, which is not defined")

    def selected(selector):
        return [(dep, containers) for dep, labels, containers in pods() if subset(selector, labels)]

    for svc in by_kind.get("Service", []):
        sel = (svc.get("spec") or {}).get("selector") or {}
        hits = selected(sel)
        if not hits:
            errors.append(f"{where(svc)}: selector {sel} selects no Deployment's pods")
        for p in (svc.get("spec") or {}).get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for dep, containers in hits:
                ports = container_ports(containers)
                if target not in ports and target not in ports.values():
                    errors.append(f"{where(svc)}: targetPort {target!r} is no container port of {where(dep)} {ports}")
    for pool in by_kind.get("InferencePool", []):
        spec = pool.get("spec") or {}
        sel = ((spec.get("selector") or {}).get("matchLabels")) or {}
        hits = selected(sel)
        if not hits:
            errors.append(f"{where(pool)}: selector {sel} selects no Deployment's pods")
        for p in spec.get("targetPorts") or []:
            for dep, containers in hits:
                if p.get("number") not in container_ports(containers).values():
                    errors.append(f"{where(pool)}: targetPort {p.get('number')} is no container port of {where(dep)}")
    for obj in by_kind.get("InferenceObjective", []):
        ref = ((obj.get("spec") or {}).get("poolRef")) or {}
        if ref.get("group", "inference.networking.k8s.io") != "inference.networking.k8s.io" or ref.get("kind", "InferencePool") != "InferencePool":
            errors.append(f"{where(obj)}: poolRef must name an InferencePool of inference.networking.k8s.io")
        if ref.get("name") not in names.get("InferencePool", set()):
            errors.append(f"{where(obj)}: poolRef names InferencePool {ref.get('name')}, which is not defined")
    for cm in by_kind.get("ConfigMap", []):
        text = (cm.get("data") or {}).get("loramux.toml")
        if text is None:
            continue
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11: the Rust test still parses it
            continue
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            errors.append(f"{where(cm)}: loramux.toml is not TOML: {e}")
            continue
        port = config.get("port", 8000)
        for dep, _, containers in pods():
            if port not in container_ports(containers).values():
                errors.append(f"{where(cm)}: loramux.toml port {port} is no container port of {where(dep)}")


def validate(directory):
    errors = []
    docs = load_docs(directory, errors)
    check_schemas(docs, errors)
    if docs:
        check_references(docs, errors)
    return docs, errors


def main():
    args = sys.argv[2:]
    target = pathlib.Path(args[0]) if args else ROOT / "deploy" / "k8s"
    docs, errors = validate(target)
    for e in errors:
        print(f"validate: ERROR {e}")
    if errors:
        print(f"validate: {target}: {len(errors)} error(s) in {len(docs)} object(s)")
        return 1
    kinds = ", ".join(sorted(where(d) for _, d in docs))
    print(f"validate: {target}: {len(docs)} objects valid (Kubernetes {K8S_VERSION} schemas, strict; GIE schemas in deploy/schemas): {kinds}")
    if args:
        return 0

    # Broken copies must fail, each for the reason planted: the checks above can fail.
    broken = [
        ("deployment.yaml", "replicas: 2", 'replicas: "two"', "replicas"),
        ("deployment.yaml", "containerPort: 8000", "containerPort: 8000\n              hostPorts: 1", "hostPorts"),
        ("inferencepool.yaml", "- number: 8000", "- number: 70000", "targetPorts"),
        ("inferencepool.yaml", "    port:\n      number: 9002\n", "", "'port' is a required property"),
        ("inferenceobjectives.yaml", "  priority: 0\n", "  priority: 0\n  criticality: Critical\n", "criticality"),
        ("inferenceobjectives.yaml", "    name: loramux\n---", "    name: loramux-typo\n---", "loramux-typo"),
        ("service.yaml", "targetPort: http", "targetPort: htpp", "htpp"),
        ("inferencepool.yaml", "app.kubernetes.io/component: model-server", "app.kubernetes.io/component: model-servers", "selects no"),
        ("deployment.yaml", "path: /ready\n              port: http\n            periodSeconds: 5\n            timeoutSeconds: 2\n            failureThreshold: 2",
         "path: /health\n              port: http\n            periodSeconds: 5\n            timeoutSeconds: 2\n            failureThreshold: 2", "readinessProbe"),
    ]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="loramux-validate-") as tmp:
        for i, (file, old, new, reason) in enumerate(broken):
            copy_dir = pathlib.Path(tmp) / f"case{i}"
            shutil.copytree(target, copy_dir)
            text = (copy_dir / file).read_text()
            if old not in text:
                print(f"validate: SELF-TEST the text {old!r} is no longer in {file}: update the broken cases")
                failures += 1
                continue
            (copy_dir / file).write_text(text.replace(old, new, 1))
            _, errs = validate(copy_dir)
            if not any(reason in e for e in errs):
                print(f"validate: SELF-TEST {file} with {new!r} should fail on {reason!r}; errors: {errs}")
                failures += 1
    if failures:
        return 1
    print(f"validate: {len(broken)} broken copies of {target.name} were refused, each for the planted reason")
    return 0


sys.exit(main())
PY
