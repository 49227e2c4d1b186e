#!/bin/bash
# `strata bench cross-node` between two servers in network namespaces joined by one veth
# pair (private addresses only), with the TCP baseline over the same link. As root:
#   scripts/bench-cross-node.sh [STRATA_BINARY]    (SIZE, DATA, COPIES, POOL_IMAGE,
#   POOL_PARENT: a folder for both pools, e.g. on tmpfs to take the disk out, and PERF: env)
# Everything it makes (namespaces, pools, pool images, loop devices) is removed at exit.
set -euo pipefail
bin=${1:-target/release/strata}
bin=$(realpath "$bin")
work=$(mktemp -d /tmp/strata-xnode.XXXXXX)
tag=$$
a=sxa$tag b=sxb$tag
cleanup() {
    for p in "$work"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
    sleep 1
    for side in a b; do
        if [ -n "${POOL_IMAGE:-}" ]; then
            "$bin" pool release --pool "$work/$side" >/dev/null 2>&1 || true
        fi
    done
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    [ -n "${KEEP_LOGS:-}" ] && cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null
    rm -rf "$work"
    if [ -n "${POOL_PARENT:-}" ]; then rm -rf "$POOL_PARENT/a" "$POOL_PARENT/b"; fi
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add "va$tag" type veth peer name "vb$tag"
ip link set "va$tag" netns "$a"
ip link set "vb$tag" netns "$b"
ip -n "$a" addr add 10.233.0.1/30 dev "va$tag"
ip -n "$b" addr add 10.233.0.2/30 dev "vb$tag"
for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
ip -n "$a" link set "va$tag" up
ip -n "$b" link set "vb$tag" up
"$bin" peer-certs --out-dir "$work/tls" 2>/dev/null
pool_args=()
[ -n "${POOL_IMAGE:-}" ] && pool_args=(--pool-image "$POOL_IMAGE")
serve() { # namespace side self-address other-node other-address
    nsenter --net="/run/netns/$1" "$bin" serve --endpoint "unix://$work/$2.sock" \
        --node-id "node-$2" --pool "${POOL_PARENT:-$work}/$2" --peer-listen "$3:9820" \
        --peer-tls-dir "$work/tls" --peer "$4=$5:9820" "${pool_args[@]}" \
        > "$work/$2.log" 2>&1 &
    echo $! > "$work/$2.pid"
}
serve "$a" a 10.233.0.1 node-b 10.233.0.2
serve "$b" b 10.233.0.2 node-a 10.233.0.1
nsenter --net="/run/netns/$b" "$bin" bench tcp-sink --listen 10.233.0.2:9999 2>/dev/null &
echo $! > "$work/sink.pid"
nsenter --net="/run/netns/$b" "$bin" bench tcp-sink --listen 10.233.0.2:9998 \
    --tls-dir "$work/tls" 2>/dev/null &
echo $! > "$work/tls-sink.pid"
for _ in $(seq 100); do [ -S "$work/a.sock" ] && [ -S "$work/b.sock" ] && break; sleep 0.1; done
nsenter --net="/run/netns/$a" "$bin" bench cross-node \
    --from "unix://$work/a.sock" --to "unix://$work/b.sock" \
    --size "${SIZE:-4Gi}" --data "${DATA:-1Gi}" --copies "${COPIES:-1}" \
    --baseline 10.233.0.2:9999 --tls-baseline 10.233.0.2:9998 --peer-tls-dir "$work/tls" \
    --disk-baseline --from-pid "$(cat "$work/a.pid")" --to-pid "$(cat "$work/b.pid")" \
    --workdir "$work/bench" &
bench=$!
if [ -n "${PERF:-}" ]; then # PERF=FILE: a profile of PERF_SIDE (a, b, or all: the machine)
    target=(-a)
    [ "${PERF_SIDE:-all}" != all ] && target=(-p "$(cat "$work/$PERF_SIDE.pid")")
    sleep "${PERF_DELAY:-3}"
    # cpu-clock: virtual machines often have no hardware counters.
    perf record -e cpu-clock -g -o "$PERF" "${target[@]}" -- sleep "${PERF_SECONDS:-2}" >/dev/null 2>&1
fi
wait $bench
