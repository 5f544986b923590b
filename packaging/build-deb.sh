#!/usr/bin/env bash
# Builds the Debian package: packaging/build-deb.sh [PROFILE] (default
# release). Needs cargo-deb (`cargo install cargo-deb`). Prints the path of
# the .deb it made.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
case "$profile" in
    dev) dir=debug ;;
    *) dir="$profile" ;;
esac
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --profile "$profile" --bins
assets="$target/$dir/assets"
rm -rf "$assets"
"$target/$dir/package-assets" "$assets"
gzip -9n "$assets"/man/*.1
mkdir -p "$target/debian"
cargo deb --quiet -p peerchat --no-build --profile "$profile" \
    --output "$target/debian/"
