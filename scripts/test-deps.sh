#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian/Ubuntu machine, and nothing when it is already
# there: mosquitto (broker + clients), socat, openssl, and a Python venv with python-hl7
# (its `mllp_send` is the third-party MLLP client the tests use).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "test-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# A broker started by apt would hold port 1883; the tests start their own on free ports.

# python-hl7 (its `mllp_send` is the third-party MLLP client) and fhir.resources 6.4.0 (the last
# FHIR R4 4.0.1 release, on pydantic 1: the independent validator of every Bundle we emit).
venv=target/test-venv
if ! "$venv/bin/python" -c 'import hl7, fhir.resources' >/dev/null 2>&1 || [ ! -x "$venv/bin/mllp_send" ]; then
  echo "test-deps: preparing $venv (python-hl7, fhir.resources)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "hl7==0.4.5" "fhir.resources==6.4.0" "pydantic<2"
fi
