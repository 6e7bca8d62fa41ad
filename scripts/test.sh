#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need, then runs them.
#   ./scripts/test.sh            # all tests
#   ./scripts/test.sh e2e        # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/test-deps.sh
cargo test --all-targets --locked "$@"
