#!/bin/bash
# On a fresh machine (Debian bookworm, root): install what Ferry needs, build, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec scripts/demo.sh
