# Shared by the launch scripts (sourced, not run): argument split and checks that must fail
# before anything is launched.
#
#   launchers/<launcher>.sh [launcher options] -- [python -m megamoe.train arguments]
#
# Without `--`, every argument goes to the trainer and the launcher runs with its defaults.

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# split_args "$@" -> LAUNCH_ARGS (before --), TRAIN_ARGS (after --)
split_args() {
    LAUNCH_ARGS=() TRAIN_ARGS=()
    local arg seen=0
    for arg in "$@"; do [[ $arg == -- ]] && seen=1; done
    if ((seen == 0)); then TRAIN_ARGS=("$@"); return; fi
    while (($#)); do
        if [[ $1 == -- ]]; then shift; TRAIN_ARGS=("$@"); return; fi
        LAUNCH_ARGS+=("$1"); shift
    done
}

# option_value NAME... -> the value of the first of --NAME VALUE / --NAME=VALUE in LAUNCH_ARGS
option_value() {
    local i name
    for name in "$@"; do
        for ((i = 0; i < ${#LAUNCH_ARGS[@]}; i++)); do
            case ${LAUNCH_ARGS[i]} in
                "$name") echo "${LAUNCH_ARGS[i + 1]:-}"; return ;;
                "$name"=*) echo "${LAUNCH_ARGS[i]#*=}"; return ;;
            esac
        done
    done
}

# require_hostfile NAME... -> error out if a hostfile option names a file that is not there
require_hostfile() {
    local hostfile
    hostfile=$(option_value "$@")
    if [[ -n $hostfile && ! -f $hostfile ]]; then
        die "hostfile '$hostfile' not found; give an existing file (format: launchers/hostfile.example)"
    fi
    echo "$hostfile"
}

# has_gpu -> true when nvidia-smi lists a GPU on this host
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

# gpu_count -> GPUs on this host (0 without nvidia-smi)
gpu_count() { if has_gpu; then nvidia-smi -L | grep -c '^GPU'; else echo 0; fi; }
