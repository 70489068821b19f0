#!/usr/bin/env python3
"""Static checks of deploy/k8s (no cluster needed; `kubectl --dry-run` is not available here).

    python3 deploy/k8s/check.py              (needs PyYAML: pip install pyyaml)
    python3 deploy/k8s/check.py --self-test  (breaks the manifests in memory, one way at a time,
                                              and fails unless every breakage is caught)

Parses every manifest (deploy/k8s/*.yaml and example-cluster/*.yaml) and checks what a typo would
silently break, for both caregate workloads: the embedded Deployment (deployment.yaml, its
ConfigMap caregate-config) and the cluster StatefulSet (example-cluster/caregate-cluster.yaml,
its ConfigMap template caregate-cluster-config):
- every document has apiVersion, kind and metadata.name;
- probes: /livez (startup, liveness) and /readyz (readiness) over HTTPS on the container port
  named `admin`, which is the port of `[admin] listen` in caregate.toml; the `https` port is
  `[server] listen`'s;
- one image for every container of both workloads, the same uid as the Dockerfile's USER;
- Services and PodDisruptionBudgets select the pods of exactly one workload (the embedded
  manifests never route to cluster pods, nor the reverse), and Services target named container
  ports that exist;
- every volumeMount has a volume; every Secret referenced (volumes and secretKeyRef, including
  the example PostgreSQL's) is one listed in secrets.md; every ConfigMap referenced is defined;
- terminationGracePeriodSeconds is above `[server] shutdown_grace_secs`;
- every key in caregate.toml is a field of its section's struct in crates/gateway/src/config.rs
  (and telemetry.rs), nested tables such as [store.postgres] and [partner.delivery] included
  (the gateway refuses unknown keys), and every absolute path in it lies under a mount (or the
  image's /etc/caregate/policies) of every container that loads it (`serve`, `db migrate`).
Embedded mode: one replica, strategy Recreate, the SQLite store.
Cluster mode: several replicas governed by a headless Service; `[store] backend = "postgres"`;
`[store.postgres] tls` is not "disable" (verify-full has a ca_file); `instance_id` in the
ConfigMap is a placeholder that is not a valid id (so the template fails closed) and an init
container renders it per pod from the downward API's metadata.name into the file `serve` reads;
`caregate db migrate` runs (init container after the rendering, or a Job) with that config;
`[feeds] export_dir` lies on a ReadWriteMany PersistentVolumeClaim; a PodDisruptionBudget covers
the pods. Exits 1 listing every failure.
"""

import copy
import pathlib
import re
import sys
import tomllib

import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
failures = []

IMAGE_POLICIES = "/etc/caregate/policies"  # in the image (deploy/Dockerfile)
VALID_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def check(condition, message):
    if not condition:
        failures.append(message)
    return bool(condition)


def load_manifests():
    docs = []
    for path in sorted(HERE.glob("*.yaml")) + sorted((HERE / "example-cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.relative_to(REPO), doc))
    return docs


def config_fields():
    """Struct name -> {serde field name: type text}, and the root struct ConfigFile, read from
    the gateway's config structs."""
    structs = {}
    for source in ("crates/gateway/src/config.rs", "crates/gateway/src/telemetry.rs"):
        text = (REPO / source).read_text()
        for match in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
            fields = {}
            rename = None
            for line in match.group(2).splitlines():
                attribute = re.search(r'#\[serde\(.*\brename = "(\w+)"', line)
                if attribute:
                    rename = attribute.group(1)
                field = re.match(r"\s*pub (\w+): (.+?),?\s*$", line)
                if field:
                    fields[rename or field.group(1)] = field.group(2)
                    rename = None
            structs[match.group(1)] = fields
    check("server" in structs.get("ConfigFile", {}) and "partner" in structs.get("ConfigFile", {}),
          "cannot read ConfigFile's sections from crates/gateway/src/config.rs")
    check("instance_id" in structs.get("PostgresSection", {}), "cannot read PostgresSection from config.rs")
    return structs


def check_table(name, table, struct, structs, where):
    fields = structs.get(struct, {})
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if not check(key in fields, f"{name}: unknown {'section' if not where else 'key'} {path}"):
            continue
        nested = [t for t in re.findall(r"\w+", fields[key]) if structs.get(t)]
        if not nested:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                check_table(name, item, nested[-1], structs, path)


def check_config(name, toml_text, structs):
    try:
        config = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as error:
        check(False, f"{name}: caregate.toml is not TOML: {error}")
        return {}
    check_table(name, config, "ConfigFile", structs, "")
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
    return int(str(listen).rsplit(":", 1)[1])


def under(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def mount_of(container, path):
    """The volumeMount of container whose mountPath holds path (the deepest)."""
    found = [m for m in container.get("volumeMounts", []) if under(path, m["mountPath"])]
    return max(found, key=lambda m: len(m["mountPath"]), default=None)


def command_text(container):
    return "\n".join(map(str, container.get("command", []) + container.get("args", [])))


def selects(selector, labels):
    return bool(selector) and selector.items() <= labels.items()


class Workload:
    """A caregate Deployment or StatefulSet and the caregate.toml its gateway container loads."""

    def __init__(self, rel, doc):
        self.rel, self.doc = rel, doc
        self.name = f"{doc['kind']} {doc['metadata']['name']}"
        self.pod = doc["spec"]["template"]["spec"]
        self.labels = doc["spec"]["template"]["metadata"].get("labels", {})
        self.init = self.pod.get("initContainers", [])
        self.containers = self.pod.get("containers", []) + self.init
        self.volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        self.gateway = next((c for c in self.pod["containers"] if c["name"] == "caregate"), None)
        self.ports = {}
        self.config_path = None
        self.config = {}
        self.configmap = None
        self.render = None


def caregate_workloads(docs):
    workloads = []
    for rel, doc in docs:
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/name") == "caregate":
            workloads.append(Workload(rel, doc))
    return workloads


def find_config(w, by_name, structs):
    """The ConfigMap holding w's caregate.toml: mounted where `serve --config` reads it
    (embedded), or mounted into the init container that renders the file there (cluster)."""
    g = w.gateway
    if not check(g is not None, f"{w.name}: no container named caregate"):
        return
    args = g.get("args", [])
    if not check(args[:2] == ["serve", "--config"] and len(args) > 2, f"{w.name}: the container does not run `caregate serve --config FILE`"):
        return
    w.config_path = args[2]
    mount = mount_of(g, w.config_path)
    if not check(mount is not None, f"{w.name}: {w.config_path} is not under a mount"):
        return
    volume = w.volumes.get(mount["name"], {})
    file = w.config_path[len(mount["mountPath"]):].lstrip("/")
    if "configMap" in volume:
        w.configmap = by_name.get(("ConfigMap", volume["configMap"]["name"]))
    else:
        # Rendered by an init container that writes into the same volume from a ConfigMap.
        for container in w.init:
            writes = [m for m in container.get("volumeMounts", []) if m["name"] == mount["name"] and not m.get("readOnly")]
            sources = [m for m in container.get("volumeMounts", []) if "configMap" in w.volumes.get(m["name"], {})]
            if writes and sources and w.config_path in command_text(container):
                w.render = container
                w.configmap = by_name.get(("ConfigMap", w.volumes[sources[0]["name"]]["configMap"]["name"]))
                file = pathlib.PurePosixPath(w.config_path).name
        check(w.render is not None, f"{w.name}: {w.config_path} is neither a ConfigMap mount nor written by an init container from one")
    if not check(w.configmap is not None and file in w.configmap.get("data", {}), f"{w.name}: no ConfigMap holds {w.config_path}"):
        return
    w.config = check_config(f"ConfigMap {w.configmap['metadata']['name']}", w.configmap["data"][file], structs)


def check_common(w, by_kind, by_name, documented, dockerfile):
    spec = w.doc["spec"]
    check(selects(spec["selector"]["matchLabels"], w.labels), f"{w.name}: selector does not match its pod labels")
    g, config = w.gateway, w.config
    if g is None or not config:
        return
    w.ports = {p["name"]: p["containerPort"] for p in g.get("ports", [])}
    server, admin = config.get("server", {}), config.get("admin", {})
    check(w.ports.get("https") == port_of(server.get("listen", ":0")), f"{w.name}: port https != [server] listen")
    check(w.ports.get("admin") == port_of(admin.get("listen", "127.0.0.1:8444")), f"{w.name}: port admin != [admin] listen")
    check(not str(admin.get("listen", "127.0.0.1:8444")).startswith("127."), f"{w.name}: [admin] listen on loopback: probes cannot reach it")
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = g.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{w.name}: {probe} path is {get.get('path')}, expected {path}")
        check(get.get("port") == "admin", f"{w.name}: {probe} is not on the admin port")
        check(get.get("scheme") == "HTTPS", f"{w.name}: {probe} is not HTTPS (the admin listener is TLS)")
    for container in w.containers:
        resources = container.get("resources", {})
        check("limits" in resources and "requests" in resources, f"{w.name}: container {container['name']} needs resource requests and limits")
    grace = server.get("shutdown_grace_secs", 30)
    check(w.pod.get("terminationGracePeriodSeconds", 30) > grace, f"{w.name}: terminationGracePeriodSeconds must exceed shutdown_grace_secs ({grace})")

    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    check(user and int(user.group(1)) == w.pod.get("securityContext", {}).get("runAsUser"), f"{w.name}: runAsUser differs from the Dockerfile's USER")
    exposed = set(map(int, re.search(r"^EXPOSE (.*)$", dockerfile, re.M).group(1).split()))
    check(set(w.ports.values()) <= exposed, f"{w.name}: container ports {w.ports} not all EXPOSEd ({exposed})")

    for container in w.containers:
        for mount in container.get("volumeMounts", []):
            check(mount["name"] in w.volumes, f"{w.name}: {container['name']} mounts unknown volume {mount['name']}")
    for volume in w.volumes.values():
        if "secret" in volume:
            check(volume["secret"]["secretName"] in documented, f"{w.name}: Secret {volume['secret']['secretName']} not in secrets.md")
        if "configMap" in volume:
            check(("ConfigMap", volume["configMap"]["name"]) in by_name, f"{w.name}: ConfigMap {volume['configMap']['name']} not defined")
        if "persistentVolumeClaim" in volume:
            check(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in by_name, f"{w.name}: PersistentVolumeClaim {volume['persistentVolumeClaim']['claimName']} not defined")
    # Every container that loads the config (serve, db migrate, …) finds every file it names.
    for container in w.containers:
        args = container.get("args", [])
        if "--config" not in args:
            continue
        path = args[args.index("--config") + 1]
        check(path == w.config_path, f"{w.name}: {container['name']} loads {path}, the gateway {w.config_path}")
        check(mount_of(container, path) is not None, f"{w.name}: {container['name']}: {path} is not under a mount")
        for path in paths_in(config):
            if under(path, IMAGE_POLICIES):
                continue
            check(mount_of(container, path) is not None, f"{w.name}: {container['name']}: caregate.toml path {path} is not under a mount")


def check_embedded(w):
    spec = w.doc["spec"]
    check(spec.get("replicas") == 1, f"{w.name}: embedded mode runs exactly one replica")
    check(spec.get("strategy", {}).get("type") == "Recreate", f"{w.name}: embedded mode needs strategy Recreate")
    check(w.config.get("store", {}).get("backend", "sqlite") == "sqlite", f"{w.name}: the embedded Deployment must use the SQLite store (cluster mode is a StatefulSet)")


def check_cluster(w, by_kind, by_name, docs):
    spec, config = w.doc["spec"], w.config
    check(spec.get("replicas", 1) >= 2, f"{w.name}: cluster mode runs several replicas")
    headless = by_name.get(("Service", spec.get("serviceName")))
    check(headless is not None and headless["spec"].get("clusterIP") == "None" and selects(headless["spec"].get("selector"), w.labels),
          f"{w.name}: serviceName must be a headless Service selecting its pods")
    store = config.get("store", {})
    postgres = store.get("postgres", {})
    check(store.get("backend") == "postgres", f"{w.name}: cluster mode needs [store] backend = \"postgres\"")
    check(postgres.get("url_file") or postgres.get("url"), f"{w.name}: [store.postgres] needs url_file (from a Secret)")
    check(postgres.get("tls") is not None and postgres.get("tls") != "disable", f"{w.name}: [store.postgres] tls must be set and not \"disable\"")
    if postgres.get("tls") == "verify-full":
        check(postgres.get("ca_file"), f"{w.name}: tls = \"verify-full\" needs [store.postgres] ca_file")

    # instance_id: a placeholder in the ConfigMap, rendered per pod from the pod's name.
    instance_id = str(postgres.get("instance_id", ""))
    rendered = check(instance_id and not VALID_INSTANCE_ID.fullmatch(instance_id),
                     f"{w.name}: [store.postgres] instance_id = {instance_id!r} would be shared by every replica; "
                     "put a placeholder (not a valid id) that an init container replaces with the pod name")
    if rendered and check(w.render is not None, f"{w.name}: no init container renders instance_id {instance_id!r} per pod"):
        text = command_text(w.render)
        pod_name_vars = [e["name"] for e in w.render.get("env", [])
                         if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"]
        check(instance_id in text, f"{w.name}: init container {w.render['name']} does not replace {instance_id!r}")
        check(any(f"${v}" in text or f"${{{v}}}" in text for v in pod_name_vars),
              f"{w.name}: init container {w.render['name']} does not substitute the pod name (downward API metadata.name)")

    # Migrations: an init container after the rendering, or a Job with the cluster's config.
    names = [c["name"] for c in w.init]
    migrate = [c for c in w.init if command_text(c).startswith("db\nmigrate\n--config")]
    jobs = [d for _, d in by_kind.get("Job", []) if "db\nmigrate" in "\n".join(command_text(c) for c in d["spec"]["template"]["spec"]["containers"])]
    check(migrate or jobs, f"{w.name}: no `caregate db migrate --config` (init container or Job)")
    for container in migrate:
        check(w.render is None or names.index(container["name"]) > names.index(w.render["name"]),
              f"{w.name}: {container['name']} runs before the config is rendered")

    # Export files on a volume every instance mounts.
    export_dir = config.get("feeds", {}).get("export_dir")
    if check(export_dir, f"{w.name}: cluster mode needs [feeds] export_dir on a shared volume"):
        mount = mount_of(w.gateway, export_dir)
        volume = w.volumes.get(mount["name"], {}) if mount else {}
        claim = by_name.get(("PersistentVolumeClaim", volume.get("persistentVolumeClaim", {}).get("claimName")))
        check(claim is not None and "ReadWriteMany" in claim["spec"].get("accessModes", []),
              f"{w.name}: [feeds] export_dir {export_dir} is not on a ReadWriteMany PersistentVolumeClaim")
    check(any(selects(p["spec"]["selector"].get("matchLabels"), w.labels) for _, p in by_kind.get("PodDisruptionBudget", [])),
          f"{w.name}: no PodDisruptionBudget covers its pods")


def run_checks(docs):
    failures.clear()
    by_kind, by_name = {}, {}
    for rel, doc in docs:
        for field in ("apiVersion", "kind"):
            check(field in doc, f"{rel}: a document without {field}")
        if doc.get("kind") != "Kustomization":
            check(doc.get("metadata", {}).get("name"), f"{rel}: a {doc.get('kind')} without a name")
        by_kind.setdefault(doc.get("kind"), []).append((rel, doc))
        by_name[(doc.get("kind"), doc.get("metadata", {}).get("name"))] = doc
    structs = config_fields()
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    secrets_md = (HERE / "secrets.md").read_text()
    documented = set(re.findall(r"^\| `(caregate-[a-z-]+)`", secrets_md, re.M))
    check(documented >= {"caregate-tls", "caregate-token-signing-key", "caregate-audit-signing-key", "caregate-feed-keys"}, "secrets.md misses a key Secret")

    workloads = caregate_workloads(docs)
    embedded = [w for w in workloads if w.doc["kind"] == "Deployment"]
    cluster = [w for w in workloads if w.doc["kind"] == "StatefulSet"]
    check(len(embedded) == 1, f"expected one caregate Deployment (embedded mode), found {len(embedded)}")
    check(len(cluster) == 1, f"expected one caregate StatefulSet (cluster mode, example-cluster/), found {len(cluster)}")
    for w in workloads:
        find_config(w, by_name, structs)
        check_common(w, by_kind, by_name, documented, dockerfile)
    for w in embedded:
        check(not str(w.rel).startswith("deploy/k8s/example-cluster/"), f"{w.rel}: the embedded Deployment belongs in deploy/k8s")
        check_embedded(w)
    for w in cluster:
        check(str(w.rel).startswith("deploy/k8s/example-cluster/"), f"{w.rel}: the cluster StatefulSet belongs in example-cluster/")
        check_cluster(w, by_kind, by_name, docs)
    images = {c["image"] for w in workloads for c in w.containers}
    check(len(images) == 1, f"caregate containers use different images: {images}")
    if len(workloads) > 1:
        configmaps = [w.configmap["metadata"]["name"] for w in workloads if w.configmap]
        check(len(set(configmaps)) == len(configmaps), f"workloads share a ConfigMap: {configmaps}")

    # Every Secret any workload references (the example PostgreSQL's included) is documented.
    for rel, doc in docs:
        for match in re.finditer(r"'secretName': '([^']+)'|'secretKeyRef': \{'name': '([^']+)'", repr(doc)):
            name = match.group(1) or match.group(2)
            check(name in documented, f"{rel}: Secret {name} not in secrets.md")

    # Services and PDBs: caregate's select the pods of exactly one workload.
    for rel, service in by_kind.get("Service", []):
        if service["spec"].get("selector", {}).get("app.kubernetes.io/name") != "caregate":
            continue
        chosen = [w for w in workloads if selects(service["spec"]["selector"], w.labels)]
        name = service["metadata"]["name"]
        if check(len(chosen) == 1, f"{rel}: Service {name} selects the pods of {len(chosen)} caregate workloads, expected 1"):
            for port in service["spec"]["ports"]:
                check(port["targetPort"] in chosen[0].ports, f"{rel}: Service {name} targetPort {port['targetPort']} is not a container port name of {chosen[0].name}")
    for rel, pdb in by_kind.get("PodDisruptionBudget", []):
        chosen = [w for w in workloads if selects(pdb["spec"]["selector"].get("matchLabels"), w.labels)]
        check(len(chosen) == 1, f"{rel}: PDB {pdb['metadata']['name']} selects the pods of {len(chosen)} caregate workloads, expected 1")

    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        check((HERE / resource).exists(), f"kustomization lists missing {resource}")
        check(not resource.startswith("example-cluster"), "example-cluster must not be applied by default")
    for rel, doc in docs:
        if str(rel).startswith("deploy/k8s/example-cluster/"):
            check(doc["metadata"].get("labels", {}).get("caregate.example/example") == "true", f"{rel}: {doc['kind']} not labelled as an example")
    return list(failures), workloads


# --self-test: each breakage must be reported with a failure containing the expected text.
def _doc(docs, kind, name):
    return next(d for _, d in docs if d.get("kind") == kind and d["metadata"]["name"] == name)


def _gateway(docs, kind, name):
    return next(c for c in _doc(docs, kind, name)["spec"]["template"]["spec"]["containers"] if c["name"] == "caregate")


def _toml(docs, configmap, old, new):
    data = _doc(docs, "ConfigMap", configmap)["data"]
    assert old in data["caregate.toml"], (configmap, old)
    data["caregate.toml"] = data["caregate.toml"].replace(old, new)


def _drop_init(docs, remove):
    spec = _doc(docs, "StatefulSet", "caregate")["spec"]["template"]["spec"]
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != remove]


BREAKAGES = [
    ("typo in an embedded config key", "unknown key server.shutdown_grace_sec",
     lambda d: _toml(d, "caregate-config", "shutdown_grace_secs", "shutdown_grace_sec")),
    ("typo in a cluster config key", "unknown key store.postgres.instance_lock_wait",
     lambda d: _toml(d, "caregate-cluster-config", "instance_lock_wait_secs", "instance_lock_wait")),
    ("typo in a cluster section", "unknown section feed",
     lambda d: _toml(d, "caregate-cluster-config", "[feeds]", "[feed]")),
    ("typo in a nested partner key", "unknown key partner.delivery.mod",
     lambda d: _toml(d, "caregate-cluster-config", 'mode = "inbox"', 'mod = "inbox"')),
    ("wrong embedded probe path", "livenessProbe path is /healthz",
     lambda d: _gateway(d, "Deployment", "caregate")["livenessProbe"]["httpGet"].update(path="/healthz")),
    ("wrong cluster probe path", "readinessProbe path is /ready,",
     lambda d: _gateway(d, "StatefulSet", "caregate")["readinessProbe"]["httpGet"].update(path="/ready")),
    ("cluster probe on the partner port", "startupProbe is not on the admin port",
     lambda d: _gateway(d, "StatefulSet", "caregate")["startupProbe"]["httpGet"].update(port="https")),
    ("instance_id fixed for every replica", "would be shared by every replica",
     lambda d: _toml(d, "caregate-cluster-config", '"@POD_NAME@"', '"gw-0"')),
    ("instance_id not substituted", "does not substitute the pod name",
     lambda d: _doc(d, "StatefulSet", "caregate")["spec"]["template"]["spec"]["initContainers"][0].update(env=[])),
    ("export_dir on a ReadWriteOnce volume", "not on a ReadWriteMany",
     lambda d: _doc(d, "PersistentVolumeClaim", "caregate-shared")["spec"].update(accessModes=["ReadWriteOnce"])),
    ("export_dir on the per-pod emptyDir", "not on a ReadWriteMany",
     lambda d: _toml(d, "caregate-cluster-config", '"/var/lib/caregate-shared/exports"', '"/var/lib/caregate/exports"')),
    ("TLS to PostgreSQL disabled", "tls must be set and not \"disable\"",
     lambda d: _toml(d, "caregate-cluster-config", 'tls = "verify-full"\nca_file = "/etc/caregate/keys/postgres-ca/ca.crt"', 'tls = "disable"')),
    ("cluster on SQLite", "backend = \"postgres\"",
     lambda d: _toml(d, "caregate-cluster-config", 'backend = "postgres"', 'backend = "sqlite"')),
    ("no migration step", "no `caregate db migrate",
     lambda d: _drop_init(d, "migrate")),
    ("CA file not mounted", "ca.crt is not under a mount",
     lambda d: _toml(d, "caregate-cluster-config", "/etc/caregate/keys/postgres-ca/ca.crt", "/etc/caregate/keys/pg-ca/ca.crt")),
    ("Secret not in secrets.md", "Secret caregate-db-uri not in secrets.md",
     lambda d: next(v for v in _doc(d, "StatefulSet", "caregate")["spec"]["template"]["spec"]["volumes"] if v["name"] == "db-url")["secret"].update(secretName="caregate-db-uri")),
    ("grace period below shutdown_grace_secs", "terminationGracePeriodSeconds must exceed",
     lambda d: _doc(d, "StatefulSet", "caregate")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20)),
    ("another image", "different images",
     lambda d: _gateway(d, "StatefulSet", "caregate").update(image="registry.example-ics.nhs.uk/caregate:0.2.0")),
    ("another uid", "runAsUser differs",
     lambda d: _doc(d, "StatefulSet", "caregate")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=1000)),
    ("embedded Service selecting the cluster pods too", "selects the pods of 2 caregate workloads",
     lambda d: _doc(d, "Service", "caregate")["spec"].update(selector={"app.kubernetes.io/name": "caregate"})),
    ("cluster pods labelled as the embedded ones", "selects the pods of 2",
     lambda d: _doc(d, "StatefulSet", "caregate")["spec"]["template"]["metadata"]["labels"].update({"app.kubernetes.io/component": "gateway"})),
]


def self_test(docs):
    clean, _ = run_checks(copy.deepcopy(docs))
    ok = not clean
    print("self-test: the manifests as they are: " + ("pass" if ok else f"FAIL {clean}"))
    for name, expected, breakage in BREAKAGES:
        broken = copy.deepcopy(docs)
        breakage(broken)
        found, _ = run_checks(broken)
        caught = any(expected in failure for failure in found)
        ok &= caught
        print(f"self-test: {name}: " + ("caught" if caught else f"NOT CAUGHT (wanted {expected!r}, got {found})"))
    print(f"self-test: {len(BREAKAGES)} breakages, " + ("all caught" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv):
    docs = load_manifests()
    if "--self-test" in argv:
        return self_test(docs)
    found, workloads = run_checks(docs)
    print(f"checked {len(docs)} manifests: " + ", ".join(
        f"{w.name} ({w.rel}, config {w.configmap['metadata']['name'] if w.configmap else '?'})" for w in workloads))
    for failure in found:
        print(f"FAIL: {failure}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
