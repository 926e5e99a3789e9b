#!/usr/bin/env bash
# Submit one nightly annotation run to a Ray cluster and wait for it; run by cron (see ./crontab).
#
#   RAY_ADDRESS      the cluster's job API (default http://127.0.0.1:8265: the head itself, or a tunnel
#                    such as `ray dashboard cluster.yaml`; the API is never exposed to the internet)
#   NIGHTLY_CONFIG   the job's YAML, a path inside this checkout or on the cluster's shared mount
#                    (default deploy/nightly.yaml)
#   RAY_AUTH_MODE / RAY_AUTH_TOKEN   as the cluster was started (Ray 2.60 has token auth on by default)
#
# Exits with the job's outcome: 0 when it succeeded, non-zero when it failed or could not be submitted.
# Overlapping runs are safe: the job takes a lock on its output and a second one exits (status 75).
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
config="${NIGHTLY_CONFIG:-deploy/nightly.yaml}"
id="nightly-$(date -u +%Y%m%dT%H%M%SZ)"
echo "submitting $id to $RAY_ADDRESS with $config"
exec ray job submit --submission-id "$id" --working-dir . -- \
  python jobs/nightly_annotate.py --config "$config"
