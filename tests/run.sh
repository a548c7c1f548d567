#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Python 3.11, pip, gcc) or a used one: installs
# megamoe with its test extra and what else is missing (Open MPI, Slurm + munge), starts the
# one-node local Slurm cluster the launch tests submit to, then runs pytest; the cluster is
# stopped again at the end, also on failure, unless it was already running. Extra args go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q torch==2.13.0          # first and pinned: no CUDA build is pulled
python -m pip install -q -e ".[test]"
bash .ci/setup-system.sh
report=$(mktemp)
cleanup="rm -f $report"
if ! bash slurm/local_cluster.sh running; then
    cleanup+="; bash slurm/local_cluster.sh stop"
fi
trap "$cleanup" EXIT
bash slurm/local_cluster.sh start

set +e
python -m pytest -q --durations=15 --junitxml="$report" "$@"  # the slowest 15 listed: the suite stays under ~20 min
status=$?
set -e
ran=$(python -c "import sys, xml.etree.ElementTree as et
suite = et.parse(sys.argv[1]).getroot().find('testsuite')
print(int(suite.get('tests')) - int(suite.get('skipped')))" "$report" 2>/dev/null || echo 0)
if [[ $ran == 0 ]]; then
    echo "tests/run.sh: no test ran" >&2
    exit 1
fi
exit $status
