#!/usr/bin/env bash
# Build the operator, agent and KVM device plugin container images FROM scratch with buildah (no
# daemon, no base image to pull) and save each as an OCI archive.
#
#   charts/build-images.sh [operator] [agent] [device-plugin]   (default: operator and agent)
#
# Environment:
#   OUT       where the archives go (default: target/images)
#   VERSION   image tag (default: the workspace package version of lockstep-operator)
#   REGISTRY  image name prefix (default: ghcr.io/lockstep)
#   CARGO_TARGET_DIR  cargo's target dir (default: target)
#
# Each binary is linked statically against glibc (-C target-feature=+crt-static). The explicit
# --target keeps those RUSTFLAGS away from build scripts and proc-macros, which must stay dynamic.
# Needs: cargo, buildah (Debian: apt-get install -y buildah). Run as root or with rootless buildah
# set up; the images contain no RUN step, so no container runtime is needed to build them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/target/images}
REGISTRY=${REGISTRY:-ghcr.io/lockstep}
TARGET=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/operator/Cargo.toml" | head -1)}

die() { echo "build-images: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "buildah not found; install it (apt-get install -y buildah)"
command -v cargo >/dev/null || die "cargo not found"

images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=(operator agent)

# image NAME -> "package containerfile" (the binary is named like its package)
recipe() {
  case "$1" in
    operator) echo "lockstep-operator $ROOT/operator/Containerfile" ;;
    agent) echo "lockstep-agent $ROOT/vmm-agent/Containerfile" ;;
    device-plugin) echo "lockstep-device-plugin $ROOT/device-plugin/Containerfile" ;;
    *) die "unknown image $1 (expected operator, agent or device-plugin)" ;;
  esac
}

# One cargo invocation for every binary: cargo unifies features per invocation, so building the
# packages one by one would resolve shared dependencies differently each time and rebuild them.
pkgs=()
for image in "${images[@]}"; do
  read -r pkg _ <<<"$(recipe "$image")"
  pkgs+=(-p "$pkg" --bin "$pkg")
done
echo "==> building static ${images[*]} for $TARGET"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$TARGET" "${pkgs[@]}" \
  --manifest-path "$ROOT/Cargo.toml"

package() { # name binary containerfile
  local name=$1 bin=$2 containerfile=$3
  local binary="$TARGET_DIR/$TARGET/release/$bin"
  [[ -x "$binary" ]] || die "$binary was not built"
  if ldd "$binary" 2>&1 | grep -q "=>"; then die "$binary is dynamically linked; a FROM scratch image cannot run it"; fi
  local ctx
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' RETURN
  cp "$binary" "$ctx/$bin"
  cp "$containerfile" "$ctx/Containerfile"
  local ref="$REGISTRY/$name:$VERSION"
  echo "==> $name: buildah bud -> $ref"
  buildah bud --format oci --layers=false -f "$ctx/Containerfile" -t "$ref" "$ctx"
  mkdir -p "$OUT"
  local archive="$OUT/$name-$VERSION.oci.tar"
  rm -f "$archive"
  buildah push "$ref" "oci-archive:$archive:$ref"
  echo "==> $name: $archive ($(du -h "$archive" | cut -f1))"
}

for image in "${images[@]}"; do
  read -r pkg containerfile <<<"$(recipe "$image")"
  package "$pkg" "$pkg" "$containerfile"
done
