#!/usr/bin/env bash
# LocalStack init hook (ready stage): create the clickstream streams, bucket and tables.
#
# LocalStack runs every executable in /etc/localstack/init/ready.d once its services answer. This
# one runs our own idempotent provisioning (`python -m infra.provision`) from the repository, which
# the compose files mount at /opt/clickstream, so LocalStack and the embedded emulator get exactly
# the same resources. Names and shard counts come from the usual CLICKSTREAM_* variables.
set -euo pipefail

code_dir=${CLICKSTREAM_CODE_DIR:-/opt/clickstream}
# LocalStack's own virtualenv has boto3; fall back to any python3 that has it (tests run this on a host).
python=""
for candidate in ${CLICKSTREAM_PYTHON:-} /opt/code/localstack/.venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import boto3, tomllib" 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "provision.sh: no python with boto3 found; cannot provision" >&2
  exit 1
fi

export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-http://localhost:4566}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
cd "$code_dir"
echo "provision.sh: provisioning clickstream resources on $AWS_ENDPOINT_URL"
exec "$python" -m infra.provision --wait 60
