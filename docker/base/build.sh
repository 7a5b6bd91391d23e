#!/bin/sh
# Builds the base image `shoptune/base:bookworm` where no container registry is
# reachable: a minimal Debian bookworm made with debootstrap, with Python 3.11,
# pip and venv, imported into the local Docker engine. GPU hosts pass a CUDA or
# vLLM base image to the builds instead (BASE_IMAGE build argument).
set -eu
name="${1:-shoptune/base:bookworm}"
if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name exists"
    exit 0
fi
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root ..."
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$name"
rm -f "$root.log"
echo "base image $name built"
