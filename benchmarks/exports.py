"""Cluster exports as kubectl writes them, for the benchmarks of the user's entry points.

    .venv/bin/python benchmarks/exports.py SERVICES [--endpoints 10] [--format json|yaml] [-o FILE]

The synthetic cluster of ``benchmarks/synthetic.py`` (the same ClusterIPs,
ports, NodePorts, affinity, traffic policies and endpoints), written out as
``kubectl get svc,endpointslices,nodes -A -o json`` (or ``-o yaml``) prints
it: a ``v1 List`` whose items carry ``kind`` and ``apiVersion`` and the full
metadata kubectl shows (uid, resourceVersion, creationTimestamp, labels such as
``kubernetes.io/service-name`` and ``endpointslice.kubernetes.io/managed-by``,
the slices' owner references and trigger-time annotations; no managedFields,
which kubectl hides), the fields the API server defaults (ipFamilies,
internalTrafficPolicy, sessionAffinity, the endpoints' serving and terminating
conditions, targetRefs, zones), and 50 Nodes with the status kubelet reports.

kubectl reads every resource as unstructured data, so its printers write the
keys of every object sorted:

* JSON: Go's ``json.MarshalIndent`` with four spaces, as ``json.dumps(indent=4,
  sort_keys=True)`` writes it (no HTML-unsafe characters occur, which Go would
  escape);
* YAML: sigs.k8s.io/yaml, that is go-yaml v2: two-space indentation, sequences
  not indented under their key, strings that would read as another type
  (timestamps, numbers, booleans, the empty string) double-quoted, others plain.

``server_objects`` feeds the test API server of the daemon benchmarks
(``benchmarks/user_paths.py``): the daemon lists the same objects that
``--once`` reads from the files, plus the ``managedFields`` the API server
adds to every object it returns. Files are cached under ``CACHE``, named by
size, format and ``GENERATOR`` (bump it when the content changes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import NODE_NAME, endpoint_address, service_manifest, slice_manifest

GENERATOR = 1
CACHE = Path(os.environ.get("KPROXY_BENCH_CACHE", "/var/tmp/kproxy-bench"))
NODES = 50
CREATED = "2025-03-14T09:26:53Z"
TRIGGERED = "2025-03-14T09:27:41Z"
FIRST_RV = 4_812_000


def _uid(kind: str, namespace: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kproxy-bench/{kind}/{namespace}/{name}"))


def _pod_name(i: int, j: int) -> str:
    return f"svc-{i}-7d9f8b6c5d-{j:05x}"


def service_object(i: int) -> dict[str, Any]:
    """Service ``i`` of the synthetic cluster as the API server returns it (without resourceVersion)."""
    base = service_manifest(i)
    name, namespace = base["metadata"]["name"], base["metadata"]["namespace"]
    spec = dict(base["spec"])
    ports = [dict(p, targetPort=8080) for p in spec["ports"]]
    kind = spec.get("type", "ClusterIP")
    spec.update(ports=ports, type=kind, ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack",
                internalTrafficPolicy="Cluster", selector={"app.kubernetes.io/name": name},
                sessionAffinity=spec.get("sessionAffinity", "None"))
    if kind == "NodePort":
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if spec["sessionAffinity"] == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "creationTimestamp": CREATED,
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": f"app-{i % 100}"},
            "name": name,
            "namespace": namespace,
            "uid": _uid("Service", namespace, name),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def slice_object(i: int, endpoints: int) -> dict[str, Any]:
    """The EndpointSlice of Service ``i`` as the EndpointSlice controller writes it (without resourceVersion)."""
    base = slice_manifest(i, endpoints)
    name, namespace = base["metadata"]["name"], base["metadata"]["namespace"]
    service = f"svc-{i}"
    eps = []
    for j, ep in enumerate(base["endpoints"]):
        assert ep["addresses"] == [endpoint_address(i, j, endpoints)]
        eps.append({
            "addresses": ep["addresses"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": ep["nodeName"],
            "targetRef": {"kind": "Pod", "name": _pod_name(i, j), "namespace": namespace,
                          "uid": _uid("Pod", namespace, _pod_name(i, j))},
            "zone": f"zone-{'abc'[int(ep['nodeName'].split('-')[1]) % 3]}",
        })
    return {
        "addressType": base["addressType"],
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": eps,
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": TRIGGERED},
            "creationTimestamp": CREATED,
            "generateName": f"{service}-",
            "generation": 1,
            "labels": {
                "app.kubernetes.io/name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "name": name,
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "blockOwnerDeletion": True, "controller": True,
                                 "kind": "Service", "name": service, "uid": _uid("Service", namespace, service)}],
            "uid": _uid("EndpointSlice", namespace, name),
        },
        "ports": base["ports"],
    }


def node_object(n: int) -> dict[str, Any]:
    """Node ``node-n``; node-0 is the benchmarks' node (192.168.50.1, zone-a, as synthetic.node_manifest)."""
    name = f"node-{n}"
    zone = "zone-a" if n == 0 else f"zone-{'abc'[n % 3]}"
    address = f"192.168.{50 + n // 250}.{1 + n % 250}"
    assert n != 0 or (name, address) == (NODE_NAME, "192.168.50.1")
    conditions = [
        {"lastHeartbeatTime": CREATED, "lastTransitionTime": CREATED, "message": message, "reason": reason,
         "status": status, "type": kind}
        for kind, status, reason, message in (
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        )
    ]
    images = [{"names": [f"registry.example.com/team-{k}/app@sha256:{uuid.uuid5(uuid.NAMESPACE_URL, str(k)).hex * 2}",
                         f"registry.example.com/team-{k}/app:v1.{k}.0"], "sizeBytes": 10_000_000 + 7919 * k}
              for k in range(12)]
    capacity = {"cpu": "16", "ephemeral-storage": "203056560Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0",
                "memory": "65856512Ki", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "creationTimestamp": CREATED,
            "labels": {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "topology.kubernetes.io/region": "region-1", "topology.kubernetes.io/zone": zone},
            "name": name,
            "uid": _uid("Node", "", name),
        },
        "spec": {"podCIDR": f"10.244.{n}.0/24", "podCIDRs": [f"10.244.{n}.0/24"],
                 "providerID": f"example://region-1/{name}"},
        "status": {
            "addresses": [{"address": address, "type": "InternalIP"}, {"address": name, "type": "Hostname"}],
            "allocatable": dict(capacity, cpu="15800m", memory="63656512Ki"),
            "capacity": capacity,
            "conditions": conditions,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "images": images,
            "nodeInfo": {"architecture": "amd64", "bootID": _uid("boot", "", name),
                         "containerRuntimeVersion": "containerd://1.7.22", "kernelVersion": "6.1.0-28-amd64",
                         "kubeProxyVersion": "", "kubeletVersion": "v1.31.4", "machineID": _uid("machine", "", name)
                         .replace("-", ""), "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "systemUUID": _uid("system", "", name)},
        },
    }


def cluster_objects(services: int, endpoints: int = 10) -> list[dict[str, Any]]:
    """Every object, in the order ``kubectl get svc,endpointslices,nodes -A`` prints them, with resourceVersions."""
    svcs = sorted((service_object(i) for i in range(services)),
                  key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
    slices = sorted((slice_object(i, endpoints) for i in range(services)),
                    key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
    nodes = sorted((node_object(n) for n in range(NODES)), key=lambda o: o["metadata"]["name"])
    objects = [*svcs, *slices, *nodes]
    for rv, obj in enumerate(objects, FIRST_RV):
        obj["metadata"]["resourceVersion"] = str(rv)
    return objects


def server_objects(services: int, endpoints: int = 10) -> list[dict[str, Any]]:
    """``cluster_objects`` as the API server lists them to the daemon: with ``metadata.managedFields``.

    The server keeps, for every object, which manager set which fields (server-side
    apply's bookkeeping), and returns it in every list and watch event; kubectl hides
    it (``--show-managed-fields=false``), so the export files do not have it. A
    Service carries the entry of the client that created it (here
    ``kubectl-client-side-apply``, without the last-applied annotation, which the
    files would show), an EndpointSlice the controller's, both in the shape a
    real cluster writes them.
    """
    objects = cluster_objects(services, endpoints)
    for obj in objects:
        meta = obj["metadata"]
        if obj["kind"] == "Service":
            meta["managedFields"] = [_service_fields(obj)]
        elif obj["kind"] == "EndpointSlice":
            meta["managedFields"] = [_slice_fields(obj)]
    return objects


def _service_fields(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    ports = {f'k:{{"port":{p["port"]},"protocol":"{p["protocol"]}"}}': {
        ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {},
        **({"f:nodePort": {}} if "nodePort" in p else {})} for p in spec["ports"]}
    fields: dict[str, Any] = {
        "f:metadata": {"f:labels": {".": {}, **{f"f:{k}": {} for k in obj["metadata"]["labels"]}}},
        "f:spec": {"f:clusterIP": {}, "f:internalTrafficPolicy": {}, "f:ports": {".": {}, **ports}, "f:selector": {},
                   "f:sessionAffinity": {}, "f:type": {},
                   **({"f:externalTrafficPolicy": {}} if "externalTrafficPolicy" in spec else {}),
                   **({"f:sessionAffinityConfig": {".": {}, "f:clientIP": {".": {}, "f:timeoutSeconds": {}}}}
                      if "sessionAffinityConfig" in spec else {})},
    }
    return {"apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": fields, "manager": "kubectl-client-side-apply",
            "operation": "Update", "time": CREATED}


def _slice_fields(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    owner = meta["ownerReferences"][0]["uid"]
    fields = {
        "f:addressType": {},
        "f:endpoints": {},
        "f:metadata": {
            "f:annotations": {".": {}, **{f"f:{k}": {} for k in meta["annotations"]}},
            "f:generateName": {},
            "f:labels": {".": {}, **{f"f:{k}": {} for k in meta["labels"]}},
            "f:ownerReferences": {".": {}, f'k:{{"uid":"{owner}"}}': {}},
        },
        "f:ports": {},
    }
    return {"apiVersion": "discovery.k8s.io/v1", "fieldsType": "FieldsV1", "fieldsV1": fields,
            "manager": "kube-controller-manager", "operation": "Update", "time": TRIGGERED}


def export_list(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``v1 List`` kubectl prints for several resources."""
    return {"apiVersion": "v1", "items": objects, "kind": "List", "metadata": {"resourceVersion": ""}}


# --- kubectl's printers -------------------------------------------------------------------------


def to_json(document: Any) -> str:
    """``kubectl -o json``: four-space indentation, keys sorted (unstructured objects), a final newline."""
    return json.dumps(document, indent=4, sort_keys=True, ensure_ascii=False) + "\n"


_YAML_OTHER_TYPES = frozenset("y Y yes Yes YES n N no No NO true True TRUE false False FALSE on On ON off Off OFF "
                              "null Null NULL ~".split())
_PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./\-]*\Z")
_NUMBERISH = re.compile(r"[-+.0-9]")


def _yaml_str(value: str) -> str:
    """A string as go-yaml v2 writes it: double-quoted if it would read as another type, else plain if it can be."""
    if value == "" or value in _YAML_OTHER_TYPES:
        return json.dumps(value, ensure_ascii=False)
    if _NUMBERISH.match(value):
        import yaml

        tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (True, False))
        if tag != "tag:yaml.org,2002:str":  # an int, a float, a timestamp: go-yaml double-quotes them
            return json.dumps(value, ensure_ascii=False)
    if _PLAIN.match(value):
        return value
    if value.isprintable():
        return "'" + value.replace("'", "''") + "'"
    return json.dumps(value, ensure_ascii=False)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return _yaml_str(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{}"  # only empty ones get here
    if isinstance(value, list):
        return "[]"
    return json.dumps(value)


def _yaml_mapping(mapping: dict[str, Any], indent: int, out: list[str]) -> None:
    pad = " " * indent
    for key in sorted(mapping):
        value = mapping[key]
        if isinstance(value, dict) and value:
            out.append(f"{pad}{_yaml_str(key)}:")
            _yaml_mapping(value, indent + 2, out)
        elif isinstance(value, list) and value:
            out.append(f"{pad}{_yaml_str(key)}:")
            _yaml_sequence(value, indent, out)  # go-yaml v2: "- " at the key's own indentation
        else:
            out.append(f"{pad}{_yaml_str(key)}: {_yaml_scalar(value)}")


def _yaml_sequence(items: list[Any], indent: int, out: list[str]) -> None:
    pad = " " * indent
    for item in items:
        if isinstance(item, dict | list) and item:
            nested: list[str] = []
            if isinstance(item, dict):
                _yaml_mapping(item, indent + 2, nested)
            else:
                _yaml_sequence(item, indent + 2, nested)
            nested[0] = f"{pad}- {nested[0][indent + 2:]}"
            out.extend(nested)
        else:
            out.append(f"{pad}- {_yaml_scalar(item)}")


def to_yaml(document: dict[str, Any]) -> str:
    """``kubectl -o yaml`` (sigs.k8s.io/yaml, go-yaml v2 block style)."""
    out: list[str] = []
    _yaml_mapping(document, 0, out)
    return "\n".join(out) + "\n"


# --- files --------------------------------------------------------------------------------------


def export_file(services: int, fmt: str, endpoints: int = 10) -> Path:
    """The cached export of ``services`` Services (written on first use); ``fmt`` is json or yaml."""
    path = CACHE / f"export-g{GENERATOR}-{services}x{endpoints}.{fmt}"
    if not path.exists():
        document = export_list(cluster_objects(services, endpoints))
        text = to_json(document) if fmt == "json" else to_yaml(document)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("services", type=int)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--format", choices=("json", "yaml"), default="json")
    parser.add_argument("-o", "--output", help="write here (default: stdout)")
    args = parser.parse_args(argv)
    document = export_list(cluster_objects(args.services, args.endpoints))
    text = to_json(document) if args.format == "json" else to_yaml(document)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
