#!/usr/bin/env bash
# Cross-builds hl7-edge for ARM appliances with Debian's cross linkers (no Docker needed).
#   cross/build.sh aarch64        # 64-bit ARM (Raspberry Pi 4/5, most industrial gateways)
#   cross/build.sh armv7          # 32-bit ARMv7 hard-float
#   cross/build.sh aarch64 --run  # also run `hl7-edge --version` under qemu-user
# The binary lands in target/<triple>/release/hl7-edge. The linker settings are in
# .cargo/config.toml; this script installs what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-aarch64}"
case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; pkg=gcc-aarch64-linux-gnu; qemu=qemu-aarch64; sysroot=/usr/aarch64-linux-gnu ;;
  armv7)   triple=armv7-unknown-linux-gnueabihf; pkg=gcc-arm-linux-gnueabihf; qemu=qemu-arm; sysroot=/usr/arm-linux-gnueabihf ;;
  *) echo "usage: $0 aarch64|armv7 [--run]" >&2; exit 2 ;;
esac
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
if [ "${2:-}" = "--run" ]; then
  command -v "$qemu" >/dev/null 2>&1 || need+=(qemu-user)
fi
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target add "$triple" >/dev/null
cargo build --release --locked --target "$triple"
bin="target/$triple/release/hl7-edge"
file "$bin" 2>/dev/null || ls -l "$bin"
if [ "${2:-}" = "--run" ]; then
  "$qemu" -L "$sysroot" "$bin" --version
fi
