#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a cycle.

  python3 scripts/module_cycles.py crates/strata-core/src

Each source file is a module; an edge goes from a module to every module its code names as
`crate::a::b` or `super::a` (test modules aside). Strongly connected groups of more than
one module are printed, and the exit code is 1 if there is any.
"""
import os
import re
import sys


def modules(root):
    found = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                continue
            src = open(path).read()
            cut = src.find("#[cfg(test)]\nmod tests")
            found["::".join(parts)] = src if cut < 0 else src[:cut]
    return found


def edges(mods):
    def resolve(path):
        segs = path.split("::")
        for k in range(len(segs), 0, -1):
            cand = "::".join(segs[:k])
            if cand in mods:
                return cand
        return None

    out = {m: set() for m in mods}
    for m, src in mods.items():
        code = "\n".join(l for l in src.split("\n") if not l.lstrip().startswith("//"))
        for ref in re.findall(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", code):
            t = resolve(ref)
            if t and t != m and not m.startswith(t + "::"):
                out[m].add(t)
        parent = m.split("::")[:-1]
        for ref in re.findall(r"\bsuper::((?:[a-z_0-9]+::)*[a-z_0-9]+)", code):
            t = resolve("::".join(parent + [ref]))
            if t and t != m and not m.startswith(t + "::"):
                out[m].add(t)
    return out


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "crates/strata-core/src"
    found = cycles(edges(modules(root)))
    for group in found:
        print(f"{root}: modules importing each other: {' '.join(group)}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
