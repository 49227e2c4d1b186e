#!/usr/bin/env python3
"""Fails when the Helm chart and the kustomize base install different things.

  python3 scripts/chart_drift.py KUSTOMIZE.yaml HELM.yaml   compare two renderings
  python3 scripts/chart_drift.py --self-test KUSTOMIZE.yaml HELM.yaml
                          also check that a change on either side alone is caught

Both renderings must hold the same objects (kind, namespace, name), and each object the
same content: images, args, env, volumes, probes, RBAC rules and subjects, the CSIDriver,
StorageClass and snapshot class fields; the certificate Secrets the chart generates are left
out (kustomize cannot make them), and so are Helm hooks. Labels and annotations are not compared, except the
default-StorageClass annotation, nor the order of a pod's containers and volumes; the kustomize base's Namespace object is not (Helm installs
into a namespace it is given).
"""
import copy
import sys

import yaml

DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# Kinds without a namespace (kustomize sets one on the snapshot classes, which it cannot know
# are cluster-scoped; the API server ignores it).
CLUSTER_SCOPED = {
    "CSIDriver",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "VolumeSnapshotClass",
    "VolumeGroupSnapshotClass",
}


def key(doc):
    meta = doc.get("metadata", {})
    namespace = "" if doc["kind"] in CLUSTER_SCOPED else meta.get("namespace", "")
    return (doc["kind"], namespace, meta["name"])


def content(doc):
    """What is compared of an object: everything but labels and annotations (the
    default-class annotation aside)."""
    doc = copy.deepcopy(doc)
    meta = doc.get("metadata", {})
    annotations = meta.pop("annotations", None) or {}
    meta.pop("labels", None)
    if doc["kind"] in CLUSTER_SCOPED:
        meta.pop("namespace", None)
    if DEFAULT_CLASS in annotations:
        meta["default-class"] = annotations[DEFAULT_CLASS]
    for template in [doc.get("spec", {}).get("template", {})]:
        template.get("metadata", {}).pop("labels", None)
        template.get("metadata", {}).pop("annotations", None)
        # A component's patch puts its container and volume first, the chart last: the
        # pod is the same either way.
        pod = template.get("spec", {})
        for field in ("containers", "volumes"):
            if field in pod:
                pod[field] = sorted(pod[field], key=lambda c: c["name"])
    return doc


def generated(doc):
    """What the chart makes at install from certificates it generates (kustomize cannot):
    the certificate Secrets and the SnapshotMetadataService that names a CA."""
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    component = labels.get("app.kubernetes.io/component")
    if doc["kind"] == "SnapshotMetadataService":
        return True
    return doc["kind"] == "Secret" and component in ("peer-tls", "snapshot-metadata-tls")


def hook(doc):
    """A Helm hook (the uninstall Job): the chart's own lifecycle, nothing kustomize has."""
    annotations = doc.get("metadata", {}).get("annotations", {}) or {}
    return "helm.sh/hook" in annotations


def index(docs):
    return {
        key(d): content(d)
        for d in docs
        if d["kind"] != "Namespace" and not generated(d) and not hook(d)
    }


def diff(a, b, path=""):
    """The paths where two objects differ, for a readable report."""
    if type(a) is not type(b):
        return [f"{path or '.'}: {a!r} != {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'kustomize' if k in a else 'helm'}")
            else:
                out.extend(diff(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)} items"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff(x, y, f"{path}[{i}]"))
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def compare(kustomize, helm):
    k, h = index(kustomize), index(helm)
    problems = [f"{'/'.join(x)}: only in the kustomize base" for x in sorted(set(k) - set(h))]
    problems += [f"{'/'.join(x)}: only in the chart" for x in sorted(set(h) - set(k))]
    for x in sorted(set(k) & set(h)):
        problems += [f"{'/'.join(x)}{p}" for p in diff(k[x], h[x])]
    return problems


def self_test(kustomize, helm):
    """A change on one side alone must be reported."""
    changed = copy.deepcopy(helm)
    ds = next(d for d in changed if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["args"].append("--log-level=debug")
    assert compare(kustomize, changed), "a changed chart arg went unnoticed"
    changed = copy.deepcopy(kustomize)
    role = next(d for d in changed if d["kind"] == "ClusterRole")
    role["rules"].pop()
    assert compare(changed, helm), "a dropped kustomize RBAC rule went unnoticed"
    changed = [d for d in helm if d["kind"] != "StorageClass"]
    assert compare(kustomize, changed), "a missing chart object went unnoticed"


def main(argv):
    test = "--self-test" in argv
    paths = [a for a in argv if a != "--self-test"]
    kustomize, helm = load(paths[0]), load(paths[1])
    problems = compare(kustomize, helm)
    for p in problems:
        print(f"DRIFT {p}", file=sys.stderr)
    if test and not problems:
        self_test(kustomize, helm)
    print("chart and kustomize base agree" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
