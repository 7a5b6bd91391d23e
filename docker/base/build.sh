#!/bin/sh
# Builds the base image `shoptune/base:bookworm` where no container registry is
# reachable: a minimal Debian bookworm made with debootstrap, with Python 3.11,
# pip and venv, imported into the local Docker engine. It serves GPU hosts too (the
# cuda locks bring CUDA's libraries as wheels); SHOPTUNE_BASE_IMAGE names another base
# with Python 3.11 and venv.
set -eu
name="${1:-shoptune/base:bookworm}"
if ! docker info >/dev/null 2>&1; then
    echo "docker/base/build.sh: cannot reach the Docker engine; is dockerd running?" >&2
    exit 1
fi
if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "docker/base/build.sh: debootstrap is needed to build $name (apt-get install debootstrap)" >&2
    exit 1
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
