#!/usr/bin/env python3
"""Static checks of deploy/k8s (no cluster needed; `kubectl --dry-run` is not available here).

    python3 deploy/k8s/check.py          (needs PyYAML: pip install pyyaml)

Parses every manifest and checks what a typo would silently break:
- every document has apiVersion, kind and metadata.name;
- the Deployment's probes: /livez (startup, liveness) and /readyz (readiness) over HTTPS on the
  container port named `admin`, which is the port of `[admin] listen` in the ConfigMap's
  caregate.toml; the `https` port is `[server] listen`'s;
- one image for every container, the same uid as the Dockerfile's USER;
- Services and the PodDisruptionBudget select the pod template's labels, and Services target
  named container ports that exist;
- every volumeMount has a volume; every Secret referenced is one listed in secrets.md;
- terminationGracePeriodSeconds is above `[server] shutdown_grace_secs`;
- every key in caregate.toml is a field of its section's struct in crates/gateway/src/config.rs
  (the gateway refuses unknown keys), and every absolute path in it lies under a mount or the
  image's /etc/caregate/policies.
Exits 1 listing every failure.
"""

import pathlib
import re
import sys
import tomllib

import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def load_manifests():
    docs = []
    for path in sorted(HERE.glob("*.yaml")) + sorted((HERE / "example-cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            rel = path.relative_to(REPO)
            for field in ("apiVersion", "kind"):
                check(field in doc, f"{rel}: a document without {field}")
            if doc.get("kind") != "Kustomization":
                check(doc.get("metadata", {}).get("name"), f"{rel}: a {doc.get('kind')} without a name")
            docs.append((rel, doc))
    return docs


def config_fields():
    """Section name -> set of field names, read from the config structs."""
    text = (REPO / "crates/gateway/src/config.rs").read_text()
    structs = {}
    for match in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
        fields = set(re.findall(r"^\s*pub (\w+):", match.group(2), re.M))
        structs[match.group(1)] = fields
    # The sections: ConfigFile's fields, named as serde names them (`rename = "..."`), typed by
    # their section struct (inside Option<> or Vec<>).
    body = re.search(r"pub struct ConfigFile \{(.*?)\n\}", text, re.S).group(1)
    sections = {}
    rename = None
    for line in body.splitlines():
        attribute = re.search(r'rename = "(\w+)"', line)
        if attribute:
            rename = attribute.group(1)
        field = re.match(r"\s*pub (\w+): (?:Option<|Vec<)?(\w+)", line)
        if field:
            sections[rename or field.group(1)] = field.group(2)
            rename = None
    check("server" in sections and "partner" in sections, f"cannot read ConfigFile's sections: {sections}")
    fields = {name: structs.get(struct, set()) for name, struct in sections.items()}
    fields["partner.delivery"] = structs["DeliverySection"]
    return fields


def check_config(toml_text, fields):
    config = tomllib.loads(toml_text)
    for section, value in config.items():
        check(section in fields, f"caregate.toml: unknown section [{section}]")
        if section not in fields:
            continue
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            for key, item in table.items():
                if section == "partner" and key == "delivery":
                    for sub in item:
                        check(sub in fields["partner.delivery"], f"caregate.toml: unknown key partner.delivery.{sub}")
                    continue
                check(key in fields[section], f"caregate.toml: unknown key {section}.{key}")
    return config


def paths_in(value):
    if isinstance(value, str) and value.startswith("/"):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from paths_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from paths_in(item)


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def main():
    docs = load_manifests()
    by_kind = {}
    for rel, doc in docs:
        by_kind.setdefault(doc["kind"], []).append((rel, doc))

    configmap = next(d for _, d in by_kind["ConfigMap"] if d["metadata"]["name"] == "caregate-config")
    config = check_config(configmap["data"]["caregate.toml"], config_fields())

    deployment = next(d for _, d in by_kind["Deployment"] if d["metadata"]["name"] == "caregate")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    check(deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector does not match its pod labels")
    check(deployment["spec"]["replicas"] == 1, "embedded mode runs exactly one replica")
    check(deployment["spec"]["strategy"]["type"] == "Recreate", "embedded mode needs strategy Recreate")

    containers = pod["containers"] + pod.get("initContainers", [])
    images = {c["image"] for c in containers}
    check(len(images) == 1, f"containers use different images: {images}")
    gateway = next(c for c in pod["containers"] if c["name"] == "caregate")
    check(gateway["args"][:2] == ["serve", "--config"], "the container does not run `caregate serve --config`")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    check(ports.get("https") == port_of(config["server"]["listen"]), "port https != [server] listen")
    check(ports.get("admin") == port_of(config["admin"]["listen"]), "port admin != [admin] listen")
    check(not config["admin"]["listen"].startswith("127."), "[admin] listen on loopback: probes cannot reach it")
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = gateway.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{probe} path is {get.get('path')}, expected {path}")
        check(get.get("port") == "admin", f"{probe} is not on the admin port")
        check(get.get("scheme") == "HTTPS", f"{probe} is not HTTPS (the admin listener is TLS)")
    check("limits" in gateway["resources"] and "requests" in gateway["resources"], "resources need requests and limits")
    grace = config["server"].get("shutdown_grace_secs", 30)
    check(pod["terminationGracePeriodSeconds"] > grace, "terminationGracePeriodSeconds must exceed shutdown_grace_secs")

    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    check(user and int(user.group(1)) == pod["securityContext"]["runAsUser"], "runAsUser differs from the Dockerfile's USER")
    exposed = set(map(int, re.search(r"^EXPOSE (.*)$", dockerfile, re.M).group(1).split()))
    check(set(ports.values()) <= exposed, f"container ports {ports} not all EXPOSEd ({exposed})")

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for container in containers:
        for mount in container.get("volumeMounts", []):
            check(mount["name"] in volumes, f"{container['name']}: mount of unknown volume {mount['name']}")
            if container is gateway:
                mounts.append(mount["mountPath"])
    documented = set(re.findall(r"^\| `(caregate-[a-z-]+)`", (HERE / "secrets.md").read_text(), re.M))
    for volume in volumes.values():
        if "secret" in volume:
            check(volume["secret"]["secretName"] in documented, f"Secret {volume['secret']['secretName']} not in secrets.md")
        if "configMap" in volume:
            names = {d["metadata"]["name"] for _, d in by_kind["ConfigMap"]}
            check(volume["configMap"]["name"] in names, f"ConfigMap {volume['configMap']['name']} not defined")
    check(documented >= {"caregate-tls", "caregate-token-signing-key", "caregate-audit-signing-key", "caregate-feed-keys"}, "secrets.md misses a key Secret")
    config_path = gateway["args"][2]
    check(any(config_path.startswith(m + "/") for m in mounts), f"{config_path} is not under a mount")
    for path in paths_in(config):
        if path.startswith("/etc/caregate/policies"):
            continue  # in the image (deploy/Dockerfile)
        check(any(path == m or path.startswith(m + "/") for m in mounts), f"caregate.toml path {path} is not under a mount")

    for rel, service in by_kind["Service"]:
        if service["metadata"]["name"].startswith("caregate-postgres") or service["metadata"]["name"].startswith("caregate-nats"):
            continue
        check(service["spec"]["selector"].items() <= labels.items(), f"{rel}: Service {service['metadata']['name']} selects no caregate pod")
        for port in service["spec"]["ports"]:
            check(port["targetPort"] in ports, f"{rel}: targetPort {port['targetPort']} is not a container port name")
    for rel, pdb in by_kind["PodDisruptionBudget"]:
        check(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{rel}: PDB selects no caregate pod")
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        check((HERE / resource).exists(), f"kustomization lists missing {resource}")
        check(not resource.startswith("example-cluster"), "example-cluster must not be applied by default")
    for rel, doc in docs:
        if str(rel).startswith("deploy/k8s/example-cluster/"):
            check(doc["metadata"].get("labels", {}).get("caregate.example/example") == "true", f"{rel}: {doc['kind']} not labelled as an example")

    print(f"checked {len(docs)} manifests")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
