#!/usr/bin/env bash
# Builds the runtime images of deploy/images/Containerfile here, offline, with buildah.
#
# No base image can be pulled here, and the runtime stages need none (`FROM scratch`): this
# script builds the statically linked binaries in the workspace (musl, OpenSSL and zlib
# linked in), puts them where the Containerfile's build stage puts them (out/), and runs
# buildah on the Containerfile's own runtime stages, with `COPY --from=build /out/` read as
# `COPY out/`. The images land in a vfs store under $MAILPIPE_IMAGE_STORE (default
# ~/.cache/mailpipe/images), tagged ghcr.io/mailpipe/mailpipe-{worker,operator}:VERSION,
# VERSION being the workspace's. Prints each image's size.
#
#   bash scripts/images.sh            # both images
#   bash scripts/images.sh worker     # one
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
store="${MAILPIPE_IMAGE_STORE:-$HOME/.cache/mailpipe/images}"
say() { printf '[images] %s\n' "$*" >&2; }

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(worker operator)
for t in "${targets[@]}"; do
  case "$t" in worker | operator) ;; *) say "no image '$t' (worker, operator)"; exit 2 ;; esac
done

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
arch="$(uname -m)"
rust_target="$arch-unknown-linux-musl"
if ! rustup target list --installed | grep -qx "$rust_target"; then
  say "rustup target add $rust_target"
  rustup target add "$rust_target"
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || { say "no version in Cargo.toml"; exit 1; }

packages=()
for t in "${targets[@]}"; do packages+=(-p "mailpipe-$t"); done
say "cargo build --profile image --target $rust_target ${packages[*]} --features static"
# cc-rs and librdkafka's configure take the compiler from these.
export CC_x86_64_unknown_linux_musl=musl-gcc CC_aarch64_unknown_linux_musl=musl-gcc
cargo build --locked --profile image --target "$rust_target" "${packages[@]}" --features static

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/out" "$context/deploy/images"
cp -a deploy/images/rootfs "$context/deploy/images/rootfs"
cp /etc/ssl/certs/ca-certificates.crt "$context/out/"
for t in "${targets[@]}"; do
  cp "$CARGO_TARGET_DIR/$rust_target/image/mailpipe-$t" "$context/out/"
done
# The runtime stages, word for word but for where the build stage's output comes from.
sed -n '/^FROM scratch AS /,$p' deploy/images/Containerfile |
  sed 's#^COPY --from=build /out/#COPY out/#' > "$context/Containerfile"
if grep -q -- '--from=' "$context/Containerfile"; then
  say "a runtime stage copies from somewhere other than the build stage's /out/"
  exit 1
fi

buildah=(buildah --storage-driver vfs --root "$store/root" --runroot "$store/run")
for t in "${targets[@]}"; do
  image="ghcr.io/mailpipe/mailpipe-$t:$version"
  say "buildah build --target $t -t $image"
  "${buildah[@]}" build --quiet --layers=false --target "$t" --build-arg "VERSION=$version" \
    --timestamp 0 -f "$context/Containerfile" -t "$image" "$context" >/dev/null
  size="$("${buildah[@]}" images --format '{{.Size}}' "$image")"
  say "$image: $size"
done
# Images of older builds that the new ones untagged.
"${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
