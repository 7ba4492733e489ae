#!/usr/bin/env bash
# The Serverless Framework's open v3 line (osls), at the version CI checks serverless.yml with,
# run from the repository root: infra/osls.sh package --stage ci | deploy --stage prod | info ...
# Needs Node.js 20.19+ (npx); the first run downloads osls from the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."
# No usage reports and no update notices: CI and deploys stay quiet and need no network but npm's.
export SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off
exec npx --yes osls@4.3.1 "$@"
