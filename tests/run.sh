#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Python 3.11, pip, gcc) or a used one:
# installs what is missing (Python packages, Open MPI, Slurm + munge), starts the one-node
# local Slurm cluster the launch tests submit to, then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q torch==2.13.0          # first and pinned: no CUDA build is pulled
python -m pip install -q -r requirements.txt
bash .ci/setup-system.sh
bash slurm/local_cluster.sh start

set +e
python -m pytest -q "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
    echo "tests/run.sh: pytest collected no tests" >&2
    exit 1
fi
exit $status
