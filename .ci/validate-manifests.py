#!/usr/bin/env python3
"""Validates Strata's Kubernetes manifests offline.

Built-in kinds go through kubernetes-validate (the Kubernetes OpenAPI schemas it ships);
the snapshot CRD kinds, which it has no schema for, are checked here against the rules of
the snapshot.storage.k8s.io/v1 CRDs that matter for Strata's objects.
"""
import subprocess
import sys

import yaml


def check_snapshot_kinds(path, doc):
    kind = doc.get("kind")
    spec = doc.get("spec", {})
    errors = []
    if kind == "VolumeSnapshotClass":
        if not isinstance(doc.get("driver"), str) or not doc["driver"]:
            errors.append("driver is required")
        if doc.get("deletionPolicy") not in ("Delete", "Retain"):
            errors.append("deletionPolicy must be Delete or Retain")
    elif kind == "VolumeSnapshot":
        source = spec.get("source", {})
        names = [k for k in ("persistentVolumeClaimName", "volumeSnapshotContentName") if source.get(k)]
        if len(names) != 1:
            errors.append("spec.source needs exactly one of persistentVolumeClaimName, volumeSnapshotContentName")
        extra = set(source) - {"persistentVolumeClaimName", "volumeSnapshotContentName"}
        if extra:
            errors.append(f"unknown spec.source fields {sorted(extra)}")
    else:
        return True
    for e in errors:
        print(f"FAIL {path} {kind}/{doc.get('metadata', {}).get('name')}: {e}")
    return not errors


def main(paths):
    ok = True
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("apiVersion", "").startswith("snapshot.storage.k8s.io/"):
                    ok &= check_snapshot_kinds(path, doc)
    result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *paths])
    ok &= result.returncode == 0
    print("manifests valid" if ok else "manifests INVALID")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
