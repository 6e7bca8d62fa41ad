#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need, then runs them.
#   ./scripts/test.sh            # all tests
#   ./scripts/test.sh e2e        # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/test-deps.sh
# --all-targets runs the lib, bin and integration tests and builds benches and examples;
# doc tests need their own run.
cargo test --all-targets --locked "$@"
if [ $# -eq 0 ]; then
  cargo test --doc --locked
fi
