#!/usr/bin/env bash
# Compiles (and lints) the device agent for Windows on this Linux machine, so its Windows-only
# code (`cfg(windows)` modules: config directory, file permissions, opening URLs and apps,
# process groups) cannot rot unseen. Needs the Rust standard library for x86_64-pc-windows-gnu
# and the mingw-w64 C compiler (for `ring`); installs both if it can, and skips with a message if
# they cannot be installed (no network). macOS is not checked: no cross C toolchain for it here.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-pc-windows-gnu

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  if ! timeout 300 rustup target add "$TARGET" >&2; then
    echo "check-windows: skipped, cannot install the $TARGET standard library" >&2
    exit 0
  fi
fi
if ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1; then
  (timeout 300 apt-get update -qq || true) >&2
  if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq gcc-mingw-w64-x86-64 >&2; then
    echo "check-windows: skipped, cannot install the mingw-w64 C compiler" >&2
    exit 0
  fi
fi
cargo clippy --locked --target "$TARGET" -p nexus-agent -- -D warnings
