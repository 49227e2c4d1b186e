#!/usr/bin/env python3
"""Validates Strata's Kubernetes manifests offline.

Built-in kinds go through kubernetes-validate (the Kubernetes OpenAPI schemas it ships);
the snapshot CRD kinds, which it has no schema for, are checked here against the rules of
the snapshot.storage.k8s.io/v1 and groupsnapshot.storage.k8s.io/v1 CRDs that matter for
Strata's objects.
"""
import subprocess
import sys

import yaml


def check_snapshot_kinds(path, doc):
    kind = doc.get("kind")
    spec = doc.get("spec", {})
    errors = []
    if kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        if not isinstance(doc.get("driver"), str) or not doc["driver"]:
            errors.append("driver is required")
        if doc.get("deletionPolicy") not in ("Delete", "Retain"):
            errors.append("deletionPolicy must be Delete or Retain")
    elif kind == "VolumeSnapshotContent":
        if not isinstance(doc.get("spec", {}).get("driver"), str):
            errors.append("spec.driver is required")
        source = spec.get("source", {})
        if len([k for k in ("snapshotHandle", "volumeHandle") if source.get(k)]) != 1:
            errors.append("spec.source needs exactly one of snapshotHandle, volumeHandle")
        if spec.get("deletionPolicy") not in ("Delete", "Retain"):
            errors.append("spec.deletionPolicy must be Delete or Retain")
        ref = spec.get("volumeSnapshotRef", {})
        if not ref.get("name") or not ref.get("namespace"):
            errors.append("spec.volumeSnapshotRef needs name and namespace")
    elif kind == "VolumeSnapshot":
        source = spec.get("source", {})
        names = [k for k in ("persistentVolumeClaimName", "volumeSnapshotContentName") if source.get(k)]
        if len(names) != 1:
            errors.append("spec.source needs exactly one of persistentVolumeClaimName, volumeSnapshotContentName")
        extra = set(source) - {"persistentVolumeClaimName", "volumeSnapshotContentName"}
        if extra:
            errors.append(f"unknown spec.source fields {sorted(extra)}")
    elif kind == "VolumeGroupSnapshot":
        source = spec.get("source", {})
        names = [k for k in ("selector", "volumeGroupSnapshotContentName") if source.get(k)]
        if len(names) != 1:
            errors.append("spec.source needs exactly one of selector, volumeGroupSnapshotContentName")
        extra = set(source) - {"selector", "volumeGroupSnapshotContentName"}
        if extra:
            errors.append(f"unknown spec.source fields {sorted(extra)}")
        selector = source.get("selector")
        if selector is not None and not selector.get("matchLabels"):
            errors.append("spec.source.selector needs matchLabels (the snapshot-controller reads only those)")
    else:
        return True
    for e in errors:
        print(f"FAIL {path} {kind}/{doc.get('metadata', {}).get('name')}: {e}")
    return not errors


def check_example(path, docs, seen):
    """An example stands on its own: every claim has a pod that consumes it (with
    WaitForFirstConsumer a claim without one stays Pending), every data source is defined in
    the same file, and no name is shared with another example, so examples apply in any
    order, alone or together."""
    errors = []
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    claimed = {
        v["persistentVolumeClaim"]["claimName"]
        for d in docs
        if d["kind"] == "Pod"
        for v in d["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if (kind, name) in seen:
            errors.append(f"{kind}/{name} is also defined in {seen[(kind, name)]}")
        seen[(kind, name)] = path
        if kind == "PersistentVolumeClaim":
            if name not in claimed:
                errors.append(f"claim {name} has no pod consuming it")
            source = d["spec"].get("dataSource")
            if source and (source["kind"], source["name"]) not in names:
                errors.append(f"claim {name} needs {source['kind']}/{source['name']} from elsewhere")
        if kind == "VolumeSnapshot":
            source = d["spec"]["source"].get("persistentVolumeClaimName")
            if source and ("PersistentVolumeClaim", source) not in names:
                errors.append(f"snapshot {name} needs claim {source} from elsewhere")
            content = d["spec"]["source"].get("volumeSnapshotContentName")
            if content and ("VolumeSnapshotContent", content) not in names:
                errors.append(f"snapshot {name} needs content {content} from elsewhere")
        if kind == "VolumeGroupSnapshot":
            wanted = d["spec"]["source"].get("selector", {}).get("matchLabels", {})
            matched = [
                c["metadata"]["name"]
                for c in docs
                if c["kind"] == "PersistentVolumeClaim"
                and wanted.items() <= c["metadata"].get("labels", {}).items()
            ]
            if wanted and not matched:
                errors.append(f"group snapshot {name} selects no claim of its own")
    for e in errors:
        print(f"FAIL {path}: {e}")
    return not errors


def main(paths):
    ok = True
    seen = {}
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("apiVersion", "").startswith(("snapshot.storage.k8s.io/", "groupsnapshot.storage.k8s.io/")):
                ok &= check_snapshot_kinds(path, doc)
        if path.startswith("examples/"):
            ok &= check_example(path, docs, seen)
    result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *paths])
    ok &= result.returncode == 0
    print("manifests valid" if ok else "manifests INVALID")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
