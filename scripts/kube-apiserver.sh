#!/bin/sh
# Builds (once) the kube-apiserver the Kubernetes client tests run against, from the Go
# module k8s.io/kubernetes, and prints its path: the minimum Kubernetes release
# deploy/versions.yaml supports by default, or the release given (`v1.35.4`: the first with
# the MutablePVNodeAffinity gate that moving a volume needs). The staging modules (k8s.io/api, client-go, ...) are pinned to the
# matching v0 tags, as k8s.io/kubernetes' own go.mod replaces them with its staging tree.
# etcd comes from Debian (etcd-server). Takes about 6 minutes on 2 cores the first time.
set -eu
version=${1:-v1.34.4}
case "$version" in
v1.*.*) staging="v0.${version#v1.}" ;;
*) echo "usage: $0 [v1.MINOR.PATCH]" >&2; exit 2 ;;
esac
dir="${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-ci}/kube-apiserver-$version"
if [ ! -x "$dir/kube-apiserver" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$dir"
    cat > "$work/go.mod" <<MOD
module strata.test/kube-apiserver

go 1.25

require k8s.io/kubernetes $version
MOD
    for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go \
        cloud-provider cluster-bootstrap code-generator component-base component-helpers \
        controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation \
        endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy \
        kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission \
        sample-apiserver sample-cli-plugin sample-controller; do
        echo "replace k8s.io/$m => k8s.io/$m $staging" >> "$work/go.mod"
    done
    printf 'package main\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n\nfunc main() {}\n' \
        > "$work/main.go"
    (cd "$work" && go mod tidy >&2 && GOFLAGS=-buildvcs=false go build -o "$dir/kube-apiserver.part" \
        k8s.io/kubernetes/cmd/kube-apiserver >&2)
    mv "$dir/kube-apiserver.part" "$dir/kube-apiserver"
fi
echo "$dir/kube-apiserver"
