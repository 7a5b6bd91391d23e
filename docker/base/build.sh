#!/bin/sh
# Builds the base image `shoptune/base:bookworm` where no container registry is
# reachable: a minimal Debian bookworm made with debootstrap, with Python 3.11, pip and
# venv, and a C compiler with Python's headers (Triton compiles a small launcher at its
# first kernel launch: vLLM's attention backend on a T4, unsloth's kernels), imported into
# the local Docker engine. It serves GPU hosts too (the cuda locks bring CUDA's libraries
# as wheels); SHOPTUNE_BASE_IMAGE names another base with the same (Python 3.11, venv, gcc,
# Python headers). The image is labelled with a digest of this script and rebuilt when the
# script changes.
set -eu
name="${1:-shoptune/base:bookworm}"
recipe="$(sha256sum "$0" | cut -c1-16)"
if ! docker info >/dev/null 2>&1; then
    echo "docker/base/build.sh: cannot reach the Docker engine; is dockerd running?" >&2
    exit 1
fi
if [ "$(docker image inspect --format '{{ index .Config.Labels "shoptune.base-recipe" }}' "$name" 2>/dev/null)" = "$recipe" ]; then
    echo "base image $name exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "docker/base/build.sh: debootstrap is needed to build $name (apt-get install debootstrap)" >&2
    exit 1
fi
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d)"
trap 'rm -rf "$root" "$root.log"' EXIT
echo "debootstrap bookworm from $mirror into $root ..."
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python3-dev,gcc,libc6-dev,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' \
    --change "LABEL shoptune.base-recipe=$recipe" - "$name"
echo "base image $name built"
