#!/bin/bash
# launch/container_check.sh: builds the training image and runs it the way users do, one PASS/FAIL/SKIP line per check.
#   bash launch/container_check.sh                                          # docker if its daemon answers, else podman
#   BASE_IMAGE=localhost/python:3.11-slim bash launch/container_check.sh    # where no registry can be reached
# Settings (environment): BASE_IMAGE (default python:3.11-slim), IMAGE (the tag built, default pipeline-check),
# ONLY="stop_1 compile" (run only these checks), KEEP=1 (keep the host folder of runs it prints).
# Exit: 0 no check failed, 1 some check failed, 2 no engine, base image or build. Needs no GPU; not part of .ci/run.
set -uo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-pipeline-check}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
CHECKS=(default readonly_data bind_runs other_uid stop_1 stop_2 compile small_shm two_machines)
TINY=(tracking=none trainer.epochs=2)  # the digits recipe: no data to fetch, seconds per epoch
SHM_TIMEOUT_S=240
FAILED=0

say() { echo "container_check: $*" >&2; }
die() { say "$*"; exit 2; }

WORK=$(mktemp -d /tmp/container-check.XXXXXX)
NAME=pcheck-$$
cleanup() {
    local name
    for name in "$NAME" "$NAME-m0" "$NAME-m1"; do  # one at a time: podman stops at a name it does not know
        "${ENGINE[@]}" rm -f -v "$name" >/dev/null 2>&1
    done
    "${ENGINE[@]}" network rm "$NAME-net" >/dev/null 2>&1
    "${ENGINE[@]}" volume rm "$NAME-cache" >/dev/null 2>&1
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}

# ---- the engine, and the options this host needs

pick_engine() {
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=(docker)
    elif command -v podman >/dev/null; then
        ENGINE=(podman)
        command -v docker >/dev/null && say "docker's CLI is here but its daemon does not answer (docker info): using podman"
    else
        die "no container engine: neither a docker daemon (docker info) nor podman. Install one of them."
    fi
    trap cleanup EXIT
}

have_base_image() {
    "${ENGINE[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return
    say "pulling $BASE_IMAGE"
    "${ENGINE[@]}" pull "$BASE_IMAGE" >"$WORK/pull.log" 2>&1 && return
    tail -n 3 "$WORK/pull.log" >&2
    die "cannot pull the base image $BASE_IMAGE (no registry reachable?). Pass a local image with the same layout
(Debian with python3.11 and pip as python/pip, apt working): BASE_IMAGE=localhost/python:3.11-slim bash $0"
}

# Hosts differ: podman's default limits (nofile 1048576) can be above what a sandboxed host lets a container
# set ("error setting rlimit"), and some hosts need runc instead of crun. Try the plain engine first, then
# those options, and say which were needed.
probe_run_options() {
    local runtime limits nproc
    limits=("")
    for nproc in $(ulimit -Hu) 32768 4096; do
        limits+=("--ulimit nofile=$(ulimit -Sn):$(ulimit -Sn) --ulimit nproc=$nproc:$nproc")
    done
    for runtime in "" "--runtime runc"; do
        for ulimits in "${limits[@]}"; do
            # shellcheck disable=SC2206  # the option strings are split into words on purpose
            RUN=($runtime $ulimits)
            if "${ENGINE[@]}" run --rm "${RUN[@]}" "$BASE_IMAGE" python -c "import os" >"$WORK/probe.log" 2>&1; then
                say "engine: $("${ENGINE[@]}" --version | head -n 1); options this host needs: ${RUN[*]:-none}"
                return
            fi
        done
    done
    tail -n 5 "$WORK/probe.log" >&2
    die "${ENGINE[*]} cannot start a container from $BASE_IMAGE here, even with --runtime runc and lower ulimits"
}

build() {
    local started=$SECONDS
    say "building $IMAGE from $BASE_IMAGE (log: $WORK/build.log; the first build downloads the CUDA torch wheels)"
    if ! "${ENGINE[@]}" build "${RUN[@]}" --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg GIT_SHA="$(git rev-parse HEAD 2>/dev/null)" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
        tail -n 20 "$WORK/build.log" >&2
        die "the image did not build (log above)"
    fi
    local size
    size=$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$IMAGE")
    say "built $IMAGE in $((SECONDS - started)) s, $((size / 1000000)) MB"
}

# ---- helpers for the checks

# run [engine run options ...] -- [image arguments ...]: a container of the image, removed afterwards; output in $OUT.
run() {
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    "${ENGINE[@]}" run --rm "${RUN[@]}" "${opts[@]}" "$IMAGE" "$@" >"$OUT" 2>&1
}

# A host folder for /runs that the given user can write to, as a user would prepare it.
runs_dir() {
    local dir="$WORK/$1"
    mkdir -p "$dir" && chown "${2:-1000:0}" "$dir" 2>/dev/null
    echo "$dir"
}

# summary.json's eval/loss of the only run under a host runs folder.
eval_loss() {
    python3 -c 'import json, sys, glob; (p,) = glob.glob(sys.argv[1] + "/*/*/summary.json"); print(json.load(open(p))["eval/loss"])' "$1"
}

# start [engine run options ...] -- [image arguments ...]: a detached container named $NAME.
start() {
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    "${ENGINE[@]}" run -d --name "$NAME" "${RUN[@]}" "${opts[@]}" "$IMAGE" "$@" >/dev/null
}

wait_for_line() {  # file, text, seconds
    local i
    for ((i = 0; i < $3; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 1
    done
    return 1
}

# ---- the checks: each returns 0 (PASS), 1 (FAIL, reason in $WHY) or 3 (SKIP, reason in $WHY)

check_default() {  # the image's own CMD: digits with its defaults, as uid 1000, on anonymous volumes
    run -- || { WHY="exit $?"; return 1; }
    grep -q "^done: digits" "$OUT" || { WHY="no 'done:' line"; return 1; }
}

check_readonly_data() {  # raw data from a read-only bind mount, shards in a named volume
    mkdir -p "$WORK/data" && cp tests/data/water-potability/water_potability.csv "$WORK/data/"
    run -v "$WORK/data:/data:ro" -v "$NAME-cache:/cache" -- launch/train.py data.cache_dir=/cache output_dir=/runs \
        recipe=tabular data.file=/data/water_potability.csv data.target=Potability "${TINY[@]}" \
        || { WHY="exit $?"; return 1; }
}

check_bind_runs() {  # `--user` a host user with a host folder for /runs: its files are that user's
    local runs
    runs=$(runs_dir bind_runs 4321:4321)
    run --user 4321:4321 -v "$runs:/runs" -- launch/train.py output_dir=/runs "${TINY[@]}" \
        || { WHY="exit $?"; return 1; }
    local foreign
    foreign=$(find "$runs" ! -user 4321 | head -n 3)
    [ -z "$foreign" ] || { WHY="files not owned by the run's user: $foreign"; return 1; }
    compgen -G "$runs/digits/*/model.safetensors" >/dev/null || { WHY="no model.safetensors on the host"; return 1; }
}

check_other_uid() {  # OpenShift: a random uid in group 0 writes HOME and the caches (W&B offline, inductor)
    run --user 12345:0 -- launch/train.py data.cache_dir=/cache output_dir=/runs trainer.epochs=2 \
        trainer.compile=true trainer.max_steps=5 \
        || { WHY="exit $?"; return 1; }
}

# stop -t 60 while it trains: a checkpoint and exit 143; the same command then finishes the run.
stop_and_resume() {
    local runs=$1
    shift
    local args=(launch/train.py output_dir=/runs run_name=stopped tracking=none trainer.epochs=40 trainer.log_every=5)
    start -v "$runs:/runs" -- "$@" "${args[@]}" || { WHY="did not start"; return 1; }
    wait_for_line "$runs/digits/stopped/metrics.jsonl" "train/loss" 300 || { WHY="no step logged in 300 s"; return 1; }
    "${ENGINE[@]}" stop -t 60 "$NAME" >/dev/null
    local code
    code=$("${ENGINE[@]}" wait "$NAME")
    "${ENGINE[@]}" logs "$NAME" >"$OUT" 2>&1
    "${ENGINE[@]}" rm -f -v "$NAME" >/dev/null
    [ "$code" = 143 ] || { WHY="stop exited $code, not 143"; return 1; }
    grep -q "stopped on SIGTERM" "$OUT" || { WHY="no 'stopped on SIGTERM' message"; return 1; }
    compgen -G "$runs/digits/stopped/checkpoints/*" >/dev/null || { WHY="no checkpoint after the stop"; return 1; }
    [ -e "$runs/digits/stopped/summary.json" ] && { WHY="finished before the stop: make the run longer"; return 1; }
    run -v "$runs:/runs" -- "$@" "${args[@]}" || { WHY="resume exited $?"; return 1; }
    grep -q "^resuming from" "$OUT" || { WHY="the second run did not resume"; return 1; }
    grep -q "^done: digits" "$OUT" || { WHY="the resumed run did not finish"; return 1; }
}

check_stop_1() { stop_and_resume "$(runs_dir stop_1)"; }
check_stop_2() { stop_and_resume "$(runs_dir stop_2)" --config_file launch/accelerate/cpu.yaml --num_processes 2; }

check_compile() {  # inductor builds C++ kernels: the image's compiler
    run -- launch/train.py output_dir=/runs "${TINY[@]}" trainer.compile=true trainer.max_steps=5 \
        || { WHY="exit $?"; return 1; }
}

check_small_shm() {  # a /dev/shm too small for the loader workers' batches: a message and exit 2, never a hang
    timeout "$SHM_TIMEOUT_S" "${ENGINE[@]}" run --rm --name "$NAME" "${RUN[@]}" --shm-size 64k "$IMAGE" \
        launch/train.py output_dir=/runs "${TINY[@]}" data.in_memory=false data.num_workers=2 trainer.batch_size=512 \
        >"$OUT" 2>&1
    local code=$?
    if [ $code = 124 ]; then
        "${ENGINE[@]}" rm -f -v "$NAME" >/dev/null 2>&1
        WHY="still running after $SHM_TIMEOUT_S s (hangs)"
        return 1
    fi
    [ $code = 2 ] && grep -q -- "--shm-size" "$OUT" || { WHY="exit $code, and no message naming --shm-size"; return 1; }
}

# Two containers as two machines on a network of their own: the same eval loss as 2 processes in one container.
check_two_machines() {
    if ! "${ENGINE[@]}" network create "$NAME-net" >"$OUT" 2>&1; then
        WHY="cannot create a container network here: $(tail -n 1 "$OUT")"
        return 3
    fi
    local one two rank args=(launch/train.py output_dir=/runs run_name=same "${TINY[@]}")
    one=$(runs_dir two_one)
    run -v "$one:/runs" -- --config_file launch/accelerate/cpu.yaml --num_processes 2 "${args[@]}" \
        || { WHY="2 processes exited $?"; return 1; }
    for rank in 0 1; do
        two=$(runs_dir "two_m$rank")
        "${ENGINE[@]}" run -d --name "$NAME-m$rank" --hostname "$NAME-m$rank" --network "$NAME-net" "${RUN[@]}" \
            -v "$two:/runs" "$IMAGE" --config_file launch/accelerate/multi_node.yaml --num_machines 2 \
            --machine_rank $rank --main_process_ip "$NAME-m0" --main_process_port 29500 --num_processes 2 \
            "${args[@]}" >/dev/null 2>>"$OUT" || { WHY="machine $rank did not start: $(tail -n 1 "$OUT")"; return 3; }
    done
    local codes
    codes="$("${ENGINE[@]}" wait "$NAME-m0") $("${ENGINE[@]}" wait "$NAME-m1")"
    "${ENGINE[@]}" logs "$NAME-m0" >"$OUT" 2>&1
    [ "$codes" = "0 0" ] || { WHY="machines exited $codes"; return 1; }
    local a b
    a=$(eval_loss "$one") && b=$(eval_loss "$WORK/two_m0") || { WHY="no summary.json"; return 1; }
    [ "$a" = "$b" ] || { WHY="eval/loss $b on two machines, $a in one container"; return 1; }
    WHY="eval/loss $a both"
}

# ---- main

pick_engine
have_base_image
probe_run_options
build
say "host folder of the runs: $WORK"
for check in "${CHECKS[@]}"; do
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $check "* ]]; then continue; fi
    OUT="$WORK/$check.log" WHY="" started=$SECONDS
    "check_$check"
    code=$?
    took=$((SECONDS - started))
    case $code in
        0) echo "PASS $check (${took} s)${WHY:+: $WHY}" ;;
        3) echo "SKIP $check (${took} s): $WHY" ;;
        *) echo "FAIL $check (${took} s): $WHY; output: $OUT"; tail -n 5 "$OUT" | sed 's/^/    /'; FAILED=1 ;;
    esac
done
[ "${KEEP:-0}" = 1 ] || [ $FAILED = 0 ] || { KEEP=1; say "kept the logs of the failed checks"; }
exit $FAILED
