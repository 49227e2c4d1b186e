#!/usr/bin/env python3
"""Keeps every copy of a pinned upstream version equal to deploy/versions.yaml.

  python3 scripts/pins.py           check: exit 1 and name each copy that differs
  python3 scripts/pins.py --write   rewrite the copies from deploy/versions.yaml

The copies: each `image:` of a pinned image in deploy/ and examples/, the snapshot CRDs'
`?ref=` in the snapshot-controller component, and the generated table in
docs/operations.md (between the `pinned-versions` markers).
"""
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSIONS = ROOT / "deploy" / "versions.yaml"
DOC = ROOT / "docs" / "operations.md"
BEGIN, END = "<!-- pinned-versions: begin -->", "<!-- pinned-versions: end -->"
CRD_URL = "https://github.com/{upstream}//client/config/crd?ref="


def load():
    with open(VERSIONS) as f:
        return yaml.safe_load(f)


def doc_table(v):
    rows = ["| component | image | tag | upstream repository |", "|---|---|---|---|"]
    for name, p in v["images"].items():
        rows.append(f"| {name} | `{p['image']}` | `{p['tag']}` | {p['upstream']} |")
    for name, crds in v["crds"].items():
        rows.append(f"| {name} CRDs | (kustomize remote resource) | `{crds['ref']}` | {crds['upstream']} |")
    k = v["kubernetes"]
    rows.append("")
    rows.append(
        f"Supported Kubernetes: {k['minimum']} and later, up to {k['built-against']} (the release"
        f" the pinned sidecars are built against); see `deploy/versions.yaml` for why."
    )
    return "\n".join(rows)


def rewrite(text, v):
    """`text` with every pinned copy set from `v`."""
    for p in v["images"].values():
        text = re.sub(
            r"(image:\s*" + re.escape(p["image"]) + r"):[\w.\-]+",
            lambda m: f"{m.group(1)}:{p['tag']}",
            text,
        )
    for crds in v["crds"].values():
        url = CRD_URL.format(upstream=crds["upstream"])
        text = re.sub(re.escape(url) + r"[\w.\-]+", url + crds["ref"], text)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{BEGIN}\n{doc_table(v)}\n{END}{tail}"
    return text


def copies():
    files = [DOC]
    for top in ("deploy", "examples"):
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in (".yaml", ".yml", ".tpl")]
    return [f for f in files if f != VERSIONS]


def main():
    write = "--write" in sys.argv[1:]
    v = load()
    stale, unpinned = [], []
    known = {p["image"] for p in v["images"].values()}
    for f in copies():
        text = f.read_text()
        for image in re.findall(r"image:\s*([\w.\-/]+\.[\w.\-/]+):", text):
            if image not in known:
                unpinned.append(f"{f.relative_to(ROOT)}: {image} is not in deploy/versions.yaml")
        fixed = rewrite(text, v)
        if fixed != text:
            stale.append(f.relative_to(ROOT))
            if write:
                f.write_text(fixed)
    if not (DOC.read_text().count(BEGIN) == 1):
        print(f"{DOC.relative_to(ROOT)} needs one {BEGIN} … {END} section", file=sys.stderr)
        return 1
    for line in unpinned:
        print(line, file=sys.stderr)
    if unpinned:
        return 1
    if stale and not write:
        for f in stale:
            print(f"{f}: a pinned version differs from deploy/versions.yaml; run python3 scripts/pins.py --write", file=sys.stderr)
        return 1
    for f in stale:
        print(f"rewrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
