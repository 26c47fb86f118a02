#!/usr/bin/env bash
# Train idm_jax on a Cloud TPU slice (single host or pod): create the slice, install the package on
# every worker, compile the training step for the slice's topology on worker 0 as a preflight
# (python -m idm_jax.aot; --skip-preflight to skip), start the same training command on all
# workers as a detached job that outlives this script and its ssh sessions, follow worker 0's log,
# restart the job (recreating a preempted slice) until it is done, then delete the slice (unless
# --keep). --attach re-attaches to a running job, --stop stops it at a saved step. See
# launch/README.md.
#
#   launch/tpu_pod.sh --name idm-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#     --repo https://github.com/ME/idm_jax.git \
#     --config configs/ffhq.py --workdir gs://BUCKET/idm/ffhq512 --data-dir gs://BUCKET/tfds \
#     -- --config.train.batch_size=64
#
# --dry-run prints every command instead of running it (gcloud is not needed for that).
set -euo pipefail

PROG=$(basename "$0")

synopsis() {
  cat <<EOF
usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --repo GIT_URL --workdir gs://...
          [--version RUNTIME] [--project PROJECT] [--config FILE] [--data-dir DIR] [--ref REF]
          [--python VERSION] [--logs-dir DIR] [--spot] [--max-restarts N] [--keep]
          [--skip-preflight] [--no-autocheckpoint] [--poll-seconds S] [--log-copy-seconds S]
          [--dry-run] [-- --config.x=y ...]
       $PROG --attach (the launch's own options)
       $PROG --stop --name NAME --zone ZONE [--project PROJECT] [--logs-dir DIR] [--keep]
          [--stop-timeout S]
EOF
}

usage() {
  synopsis
  cat <<EOF

Creates a Cloud TPU VM slice, installs idm_jax on every worker, compiles the training step for
the slice's topology on worker 0 (python -m idm_jax.aot: a config that cannot run or does not
fit in HBM stops here, before training starts), then starts python -m idm_jax.main on all workers
at once as a detached job (setsid nohup): losing this terminal or its ssh sessions does not touch
it. Each worker logs to ~/idm_jax_train.log, copied to WORKDIR/logs/worker-N.log periodically and
at the end. The script then follows worker 0's log; when the job stops without finishing (a
SIGTERM or SIGHUP on a worker, a maintenance event, a preempted --spot slice) it starts it again
(recreating a preempted slice), resuming from the checkpoint in the bucket, at most --max-restarts
times. When the job is done it copies worker 0's log back and deletes the slice (unless --keep).
Interrupting the script (Ctrl-C, a closed terminal) after the job started leaves the job and the
slice running: --attach follows it again, --stop stops it.

required (launch and --attach):
  --name NAME               TPU VM name (must not exist yet for a launch)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8
  --repo GIT_URL            git URL the workers clone (must be reachable from the workers)
  --workdir gs://...        checkpoints / logs / samples; a gs:// path all workers share

optional:
  --version RUNTIME         TPU VM runtime (default from the type: v2/v3/v4 $VERSION_V4,
                            v5e (v5litepod-*) $VERSION_V5E, v5p $VERSION_V5P, v6e $VERSION_V6E)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --config FILE             config file inside the repo (default: $DEFAULT_CONFIG)
  --data-dir DIR            TFDS data_dir of a dataset made by idm_jax.data.prepare (gs://: every
                            worker reads its share straight from the bucket, nothing is staged);
                            adds --config.data.source=tfds --config.data.tfds_data_dir=DIR
                            (the dataset name comes from the config or --config.data.tfds_name=)
  --ref REF                 branch, tag or commit to check out (default: the repo's default)
  --python VERSION          Python the workers' virtualenv uses, via uv (default: $DEFAULT_PYTHON)
  --logs-dir DIR            where worker 0's log is copied (default: ./tpu_logs/NAME)
  --spot                    create a Spot (preemptible) slice; a preempted one is recreated
  --max-restarts N          restarts of a job that stopped unfinished, slice recreations
                            included (default: $DEFAULT_MAX_RESTARTS)
  --keep                    do not delete the slice when the script ends
  --skip-preflight          do not run the AOT compile check before training
  --no-autocheckpoint       do not ask for SIGTERM before host maintenance (see README)
  --poll-seconds S          how often the job and the slice are checked (default: $DEFAULT_POLL)
  --log-copy-seconds S      how often each worker copies its log to the bucket (default: $DEFAULT_LOG_COPY)
  --attach                  follow (and restart) a job started earlier; give the launch's options
  --stop                    SIGTERM every worker's trainer, wait for the saved step, copy the
                            log and delete the slice (unless --keep)
  --stop-timeout S          how long --stop waits for the save (default: $DEFAULT_STOP_TIMEOUT)
  --dry-run                 print every command instead of running it
  -h, --help                this message

Everything after -- is passed to python -m idm_jax.main unchanged (e.g. --config.train.batch_size=64).
EOF
}

# Runtime versions Google documents for JAX (cloud.google.com/tpu/docs/runtimes).
VERSION_V4='tpu-ubuntu2204-base'
VERSION_V5E='v2-alpha-tpuv5-lite'
VERSION_V5P='v2-alpha-tpuv5'
VERSION_V6E='v2-alpha-tpuv6e'
DEFAULT_CONFIG=configs/ffhq.py
DEFAULT_PYTHON=3.12
DEFAULT_MAX_RESTARTS=5
DEFAULT_POLL=60
DEFAULT_LOG_COPY=120
DEFAULT_STOP_TIMEOUT=900

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  synopsis >&2
  printf 'run %s --help for details\n' "$PROG" >&2
  exit 2
}

say() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

name="" zone="" accelerator_type="" version="" project="" repo="" ref=""
config=$DEFAULT_CONFIG workdir="" data_dir="" python_version=$DEFAULT_PYTHON logs_dir=""
spot=0 keep=0 dry_run=0 preflight=1 autocheckpoint=1 mode=launch
max_restarts=$DEFAULT_MAX_RESTARTS poll=$DEFAULT_POLL log_copy=$DEFAULT_LOG_COPY
stop_timeout=$DEFAULT_STOP_TIMEOUT
overrides=()

need_value() {  # need_value OPTION NUM_REMAINING_ARGS
  [[ $2 -ge 2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$1" $#; name=$2; shift 2 ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; accelerator_type=$2; shift 2 ;;
    --version) need_value "$1" $#; version=$2; shift 2 ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --repo) need_value "$1" $#; repo=$2; shift 2 ;;
    --ref) need_value "$1" $#; ref=$2; shift 2 ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --data-dir) need_value "$1" $#; data_dir=$2; shift 2 ;;
    --python) need_value "$1" $#; python_version=$2; shift 2 ;;
    --logs-dir) need_value "$1" $#; logs_dir=$2; shift 2 ;;
    --max-restarts) need_value "$1" $#; max_restarts=$2; shift 2 ;;
    --poll-seconds) need_value "$1" $#; poll=$2; shift 2 ;;
    --log-copy-seconds) need_value "$1" $#; log_copy=$2; shift 2 ;;
    --stop-timeout) need_value "$1" $#; stop_timeout=$2; shift 2 ;;
    --name=*|--zone=*|--accelerator-type=*|--version=*|--project=*|--repo=*|--ref=*|--config=*|\
    --workdir=*|--data-dir=*|--python=*|--logs-dir=*|--max-restarts=*|--poll-seconds=*|\
    --log-copy-seconds=*|--stop-timeout=*)
      # --opt=value: split once and re-dispatch.
      opt=${1%%=*}; val=${1#*=}; shift; set -- "$opt" "$val" "$@" ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --skip-preflight) preflight=0; shift ;;
    --no-autocheckpoint) autocheckpoint=0; shift ;;
    --attach) mode=attach; shift ;;
    --stop) mode=stop; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option: $1 (training overrides go after --)" ;;
  esac
done

for pair in "--max-restarts:$max_restarts" "--poll-seconds:$poll" "--log-copy-seconds:$log_copy" \
            "--stop-timeout:$stop_timeout"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "${pair%%:*} must be a whole number of ${pair%%:*}, got '${pair#*:}'"
done
[[ $poll -ge 1 && $log_copy -ge 1 ]] || die "--poll-seconds and --log-copy-seconds must be at least 1"

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
if [[ $mode != stop ]]; then
  [[ -n $accelerator_type ]] || die "--accelerator-type is required"
  [[ -n $repo ]] || die "--repo is required"
  [[ -n $workdir ]] || die "--workdir is required"
  [[ $workdir == gs://* ]] || die "--workdir must be a gs:// path (every worker writes checkpoints to it)"
fi
[[ -n $logs_dir ]] || logs_dir="./tpu_logs/$name"

# default_version TYPE: the runtime Google documents for the TPU generation of TYPE.
default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "$VERSION_V4" ;;
    v5litepod-*|v5e-*) echo "$VERSION_V5E" ;;
    v5p-*) echo "$VERSION_V5P" ;;
    v6e-*) echo "$VERSION_V6E" ;;
    *) return 1 ;;
  esac
}

if [[ $mode != stop && -z $version ]]; then
  version=$(default_version "$accelerator_type") \
    || die "no default --version for accelerator type '$accelerator_type'; pass --version (see cloud.google.com/tpu/docs/runtimes)"
fi

# Autocheckpoint (Cloud TPU API, v2-v4 and v5e only; gcloud's alpha track): before host
# maintenance the process using the TPU gets SIGTERM and up to 5 minutes to exit, so the
# trainer saves an agreed step. Elsewhere maintenance still happens without notice.
autocheckpoint_supported() {
  case "$1" in
    v2-*|v3-*|v4-*|v5litepod-*|v5e-*) return 0 ;;
    *) return 1 ;;
  esac
}
use_autocheckpoint=0
if [[ $mode == launch && $autocheckpoint -eq 1 ]] && autocheckpoint_supported "$accelerator_type"; then
  use_autocheckpoint=1
fi

if [[ $dry_run -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH (install the Google Cloud SDK, or use --dry-run)"
fi

# ---------------------------------------------------------------------------------------------
# Running commands.

# show ARG...: the command as one shell-readable line (single-quoted where needed).
show() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  printf '+ %s\n' "${out% }"
}

# run ARG...: print the command; execute it unless --dry-run.
run() {
  show "$@"
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

# quiet ARG...: execute without printing (the polls, which would flood the terminal); in a dry
# run print it once instead and fail, so that nothing is parsed from it.
quiet() {
  if [[ $dry_run -eq 1 ]]; then
    show "$@"
    return 1
  fi
  "$@"
}

# q ARG...: each argument quoted for the workers' bash (printf %q), joined by spaces.
q() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

gcloud_common=(--zone "$zone")
[[ -n $project ]] && gcloud_common+=(--project "$project")
tpu=(gcloud compute tpus tpu-vm)

ssh_all() {  # ssh_all COMMAND: the command on every worker, unprinted (see quiet)
  quiet "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=all --command="$1"
}

ssh_0() {  # ssh_0 COMMAND: the command on worker 0, unprinted (see quiet)
  quiet "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=0 --command="$1"
}

# ---------------------------------------------------------------------------------------------
# Commands the workers run. Every value from the command line goes through q (printf %q).

# shellcheck disable=SC2016  # $HOME is meant to expand on the workers, not here
remote_repo='$HOME/idm_jax'
# shellcheck disable=SC2016
remote_venv='$HOME/idm_venv'
remote_log=idm_jax_train.log    # relative to the workers' home directory
preflight_log=idm_jax_preflight.log
# shellcheck disable=SC2016
run_dir='$HOME/idm_jax_run'     # the job's state on each worker (see the runner below)

install_cmd="set -euo pipefail; cd \$HOME"
install_cmd+="; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
install_cmd+="; export PATH=\$HOME/.local/bin:\$PATH"
install_cmd+="; rm -rf $remote_repo; git clone $(q "$repo") $remote_repo"
if [[ -n $ref ]]; then
  install_cmd+="; git -C $remote_repo checkout $(q "$ref")"
fi
install_cmd+="; uv venv --python $(q "$python_version") $remote_venv"
# The [gcs] extra: gcsfs and google-cloud-storage, through which the driver reads and writes the
# gs:// workdir (checkpoints go through tensorstore, TFDS data through array_record's reader).
install_cmd+="; uv pip install --python $remote_venv/bin/python 'jax[tpu]' -e \"${remote_repo}[gcs]\""
install_cmd+="; $remote_venv/bin/python -c 'import jax, idm_jax; print(jax.__version__, idm_jax.__file__)'"

train_args=(--config="$config" --workdir="$workdir")
if [[ -n $data_dir ]]; then
  train_args+=(--config.data.source=tfds --config.data.tfds_data_dir="$data_dir")
fi
train_args+=("${overrides[@]+"${overrides[@]}"}")

# The preflight compiles for the accelerator type (idm_jax.aot maps it to libtpu's topology) with
# the same config and --config.* overrides; it runs on the CPU of worker 0, leaving the TPU free.
preflight_args=(--config="$config" --topology="$accelerator_type")
for a in "${train_args[@]}"; do
  if [[ $a == --config.* ]]; then preflight_args+=("$a"); fi
done
preflight_cmd="set -o pipefail; cd $remote_repo"
preflight_cmd+="; $remote_venv/bin/python -m idm_jax.aot $(q "${preflight_args[@]}")"
preflight_cmd+=" 2>&1 | tee \$HOME/$preflight_log"

# The runner: one per worker, in its own session (setsid) with no terminal and no pipe to the
# ssh session (nohup, every stream redirected), so neither a closed ssh connection nor a dead
# laptop can reach the trainer: no SIGHUP, no broken pipe. It starts the trainer, records its
# pid, copies the log to the bucket every few minutes and at the end, and leaves the outcome in
# RUN_DIR/state: `running - -`, `finished 0 -`, `stopped 0 STEP` (a SIGTERM or SIGHUP: the step
# was saved), `interrupted RC -` (killed by one before its handler was in place, nothing saved:
# restartable), `failed RC -`. Arguments: run dir, worker number, copy period (s), workdir,
# python, then python's arguments. A signal meant for the trainer (a maintenance notice reaches
# every process) must not end the runner before its last copy: it traps them (a trap, unlike an
# ignored signal, is not inherited by the trainer). TQDM_MININTERVAL: the progress bar in a file
# takes a line a minute, not ten a second. On a new VM (a recreated slice) the log starts from
# its copy in the bucket, so the copy keeps the whole run's history.
# shellcheck disable=SC2016  # expanded by the workers' bash
runner='
run_dir=$1 worker=$2 copy_every=$3 workdir=$4 py=$5
shift 5
log=$HOME/idm_jax_train.log
set_state() { printf "%s\n" "$*" > "$run_dir/state.tmp" && mv "$run_dir/state.tmp" "$run_dir/state"; }
bucket_log() {  # bucket_log up|down: the log to WORKDIR/logs/worker-N.log, or back from it
  "$py" -c "import sys
from idm_jax.storage import files
way, log, workdir, worker = sys.argv[1:5]
remote = files.join(workdir, \"logs\", f\"worker-{worker}.log\")
if way == \"up\":
  with open(log, \"rb\") as f:
    files.write_atomic(remote, f.read())
elif files.exists(remote):
  with open(log, \"wb\") as f:
    f.write(files.read_bytes(remote))" "$1" "$log" "$workdir" "$worker" >> "$run_dir/runner.log" 2>&1 \
    || echo "could not copy the log ($1) between $log and $workdir/logs" >> "$run_dir/runner.log"
}
copy_log() { bucket_log up; }
trap "true" TERM HUP INT
[[ -f $log ]] || bucket_log down
offset=$(stat -c %s "$log" 2>/dev/null || echo 0)
TQDM_MININTERVAL=60 "$py" "$@" >> "$log" 2>&1 < /dev/null &
trainer=$!
echo "$trainer" > "$run_dir/pid"
ticks=0
while kill -0 "$trainer" 2>/dev/null; do
  sleep 1
  ticks=$((ticks + 1))
  if (( ticks % copy_every == 0 )); then copy_log; fi
done
rc=0
wait "$trainer" || rc=$?
stop_line=$(tail -c +"$((offset + 1))" "$log" | grep -o "stopped at step [0-9]* after SIG[A-Z]*" | tail -n 1 || true)
if [[ $rc -eq 143 || $rc -eq 129 ]]; then
  set_state interrupted "$rc" -
elif [[ $rc -ne 0 ]]; then
  set_state failed "$rc" -
elif [[ -n $stop_line ]]; then
  set_state stopped 0 "$(echo "$stop_line" | grep -o "[0-9][0-9]*" | head -n 1)"
else
  set_state finished 0 -
fi
copy_log
'

# The worker's number: the metadata server's agent-worker-number (what jax reads on a Cloud TPU
# pod); IDM_JAX_WORKER overrides it (the tests' fake slice sets it).
# shellcheck disable=SC2016
worker_id='${IDM_JAX_WORKER:-$(curl -sf -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}'

# runs PID: whether the process runs. A zombie does not: an ended runner whose new parent (PID 1
# of a container, a slow reaper) has not collected it would otherwise look alive forever.
# shellcheck disable=SC2016
runs_fn='runs() { kill -0 "$1" 2>/dev/null && [[ $(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -c1) != Z ]]; }'

# Starts the runner unless one is running; `ssh` returns at once (no stream left open).
start_cmd="set -euo pipefail; $runs_fn; mkdir -p $run_dir; cd $remote_repo"
start_cmd+="; if [[ -f $run_dir/runner_pid ]] && runs \"\$(cat $run_dir/runner_pid)\""
start_cmd+="; then echo 'idm_jax: already running'; exit 0; fi"
start_cmd+="; worker=$worker_id; echo \"\$worker\" > $run_dir/worker"
start_cmd+="; rm -f $run_dir/stop_requested $run_dir/pid; echo 'running - -' > $run_dir/state"
start_cmd+="; setsid nohup bash -c $(q "$runner") idm_jax_runner $run_dir \"\$worker\" $log_copy"
start_cmd+=" $(q "$workdir") $remote_venv/bin/python -m idm_jax.main $(q "${train_args[@]}")"
start_cmd+=" < /dev/null > $run_dir/runner.log 2>&1 &"
start_cmd+=" echo \$! > $run_dir/runner_pid; echo \"idm_jax: started on worker \$worker\""

# One line per worker: `idm_jax_status WORKER STATE RC STEP REQUESTED`; STATE `lost` when the
# runner died without a verdict (the VM restarted), `none` when no job was ever started there.
status_cmd="$runs_fn; run_dir=$run_dir; state='none - -'"
status_cmd+="; [[ -f \$run_dir/state ]] && state=\$(cat \$run_dir/state)"
status_cmd+="; if [[ \$state == running* ]] && ! runs \"\$(cat \$run_dir/runner_pid 2>/dev/null)\""
status_cmd+="; then state='lost - -'; fi"
status_cmd+="; requested=-; [[ -f \$run_dir/stop_requested ]] && requested=requested"
status_cmd+="; echo \"idm_jax_status \$(cat \$run_dir/worker 2>/dev/null || echo ?) \$state \$requested\""

# SIGTERM to the trainer (the stop handler: every worker stops at one step and saves it).
stop_cmd="run_dir=$run_dir; mkdir -p \$run_dir; touch \$run_dir/stop_requested"
stop_cmd+="; pid=\$(cat \$run_dir/pid 2>/dev/null || true)"
stop_cmd+="; if [[ -n \$pid ]] && kill -TERM \"\$pid\" 2>/dev/null; then echo \"idm_jax: SIGTERM sent to \$pid\""
stop_cmd+="; else echo 'idm_jax: no trainer running'; fi"

# follow_cmd OFFSET: the log's size, a newline, then its bytes from OFFSET on.
follow_cmd() {
  local c="log=\$HOME/$remote_log; size=\$(stat -c %s \$log 2>/dev/null || echo 0); echo \$size"
  c+="; [[ \$size -gt $1 ]] && tail -c +$(($1 + 1)) \$log | head -c \$((size - $1)); true"
  printf '%s' "$c"
}

# ---------------------------------------------------------------------------------------------
# The slice.

create_args=("${tpu[@]}" create "$name" "${gcloud_common[@]}"
             --accelerator-type "$accelerator_type" --version "$version")
[[ $spot -eq 1 ]] && create_args+=(--spot)
if [[ $use_autocheckpoint -eq 1 ]]; then
  # --autocheckpoint-enabled exists on the alpha track of `tpu-vm create` only.
  create_args=(gcloud alpha "${create_args[@]:1}" --autocheckpoint-enabled)
fi

create_slice() {
  run "${create_args[@]}"
}

delete_slice_now() {
  run "${tpu[@]}" delete "$name" "${gcloud_common[@]}" --quiet
}

install_and_check() {
  run "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=all --command="$install_cmd"
}

start_job() {
  run "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=all --command="$start_cmd"
}

slice_state() {  # READY, PREEMPTED, CREATING, ...; NOT_FOUND; UNKNOWN if describe fails otherwise
  local s err
  err=$(mktemp)
  if s=$(quiet "${tpu[@]}" describe "$name" "${gcloud_common[@]}" --format='value(state)' 2>"$err"); then
    echo "${s:-UNKNOWN}"
  elif grep -q NOT_FOUND "$err"; then
    echo NOT_FOUND
  else
    echo UNKNOWN
  fi
  rm -f "$err"
}

# worker_statuses: the `idm_jax_status` lines of every worker (none if ssh failed).
worker_statuses() {
  local out
  out=$(ssh_all "$status_cmd" 2>/dev/null) || true
  grep '^idm_jax_status ' <<<"$out" || true
}

# verdict STATUS_LINES: running | done | stopped-by-user | restart | failed RC | unknown
verdict() {
  local lines=$1 n=0 any_running=0 w0="" all_done=1 w state rc requested
  while read -r _ w state rc _ requested; do
    [[ -n ${state:-} ]] || continue
    n=$((n + 1))
    case $state in
      failed) echo "failed $rc"; return ;;
      running) any_running=1 ;;
      finished|stopped) ;;
      *) all_done=0 ;;
    esac
    [[ $state == finished ]] || [[ $w != 0 ]] || all_done=0
    if [[ $w == 0 ]]; then w0="$state $requested"; fi
  done <<<"$lines"
  if [[ $n -eq 0 ]]; then echo unknown; return; fi
  if [[ $any_running -eq 1 ]]; then echo running; return; fi
  if [[ $w0 == *" requested" ]]; then echo stopped-by-user; return; fi
  if [[ $all_done -eq 1 && $w0 == finished* ]]; then echo 'done'; return; fi
  echo restart
}

log_offset=-1
slice_gone=0    # set while the slice is known not to exist (no delete needed at the end)
follow_log() {  # prints what worker 0's log gained since the last call (the tail on the first)
  local out size
  if [[ $log_offset -lt 0 ]]; then
    out=$(ssh_0 "log=\$HOME/$remote_log; stat -c %s \$log 2>/dev/null || echo 0; tail -n 20 \$log 2>/dev/null; true" 2>/dev/null) || return 0
  else
    out=$(ssh_0 "$(follow_cmd "$log_offset")" 2>/dev/null) || return 0
  fi
  size=${out%%$'\n'*}
  [[ $size =~ ^[0-9]+$ ]] || return 0
  if [[ $out == *$'\n'* && -n ${out#*$'\n'} ]]; then printf '%s\n' "${out#*$'\n'}"; fi
  log_offset=$size
}

copy_log_back() {
  run mkdir -p "$logs_dir"
  run "${tpu[@]}" scp "$name:$remote_log" "$logs_dir/" "${gcloud_common[@]}" --worker=0 \
    || say "warning: could not copy the training log from worker 0"
  if [[ -n $workdir ]]; then say "every worker's log: $workdir/logs/worker-N.log"; fi
}

attach_hint() {
  say "the job keeps running on TPU $name; follow it with the same command and --attach, or stop"
  say "it (saving a step) with: $PROG --stop --name $name --zone $zone${project:+ --project $project}"
}

# ---------------------------------------------------------------------------------------------
# Following the job to its end.

# supervise: polls until the job is done (0), stopped with --stop (0), failed (its exit status)
# or out of restarts (1). A job that stopped unfinished on a READY slice (a SIGTERM or SIGHUP
# that nobody asked for: maintenance, a preemption notice) is started again once a second poll
# still sees it stopped; a PREEMPTED or TERMINATED slice (with --spot also a vanished one) is
# deleted and created anew, each try of that counted as a restart.
supervise() {
  local restarts=0 unknown=0 pending=0 recreate=0 state lines v
  if [[ $dry_run -eq 1 ]]; then
    say "then, every $poll s: the slice's state, worker 0's new log lines and every worker's job:"
    quiet "${tpu[@]}" describe "$name" "${gcloud_common[@]}" --format='value(state)' || true
    ssh_0 "$(follow_cmd 0)" || true
    ssh_all "$status_cmd" || true
    return 0
  fi
  while true; do
    # recreate: 1 = the slice must be created, 2 = it exists and needs the install and the start.
    if [[ $recreate -eq 1 ]]; then
      restarts=$((restarts + 1))
      if [[ $restarts -gt $max_restarts ]]; then
        say "the slice is gone and --max-restarts=$max_restarts restarts are used up"
        return 1
      fi
      say "creating the slice again (restart $restarts of $max_restarts)"
      if create_slice; then
        recreate=2 slice_gone=0
      else
        say "warning: creating the slice failed; trying again at the next poll"
        sleep "$poll"
        continue
      fi
    fi
    if [[ $recreate -eq 2 ]]; then
      if install_and_check && start_job; then
        recreate=0 log_offset=-1
      else
        restarts=$((restarts + 1))
        if [[ $restarts -gt $max_restarts ]]; then
          say "installing or starting on the new slice failed; --max-restarts=$max_restarts used up"
          return 1
        fi
        say "warning: installing or starting on the new slice failed; trying again at the next poll"
        sleep "$poll"
        continue
      fi
    fi
    state=$(slice_state)
    case $state in
      READY)
        unknown=0
        follow_log
        lines=$(worker_statuses)
        v=$(verdict "$lines")
        # The lines logged between this poll's follow and the job's end: shown before leaving.
        [[ $v == running || $v == unknown ]] || follow_log
        case $v in
          running) pending=0 ;;
          done) say "training finished"; return 0 ;;
          stopped-by-user)
            say "stopped with --stop; worker 0: $(awk '$2 == 0 {print $3 ", step " $5}' <<<"$lines")"
            return 0 ;;
          failed*) say "training failed on a worker (exit ${v#failed })"; printf '%s\n' "$lines" >&2
                   return "${v#failed }" ;;
          unknown) unknown=$((unknown + 1)) ;;
          restart)
            if [[ $pending -eq 0 ]]; then
              pending=1   # a preemption notice: the slice may go within the next poll
            else
              pending=0
              restarts=$((restarts + 1))
              if [[ $restarts -gt $max_restarts ]]; then
                say "the job stopped unfinished and --max-restarts=$max_restarts restarts are used up"
                return 1
              fi
              say "the job stopped unfinished; starting it again (restart $restarts of $max_restarts):"
              printf '%s\n' "$lines" >&2
              start_job || say "warning: could not start the job; trying again at the next poll"
            fi ;;
        esac ;;
      PREEMPTED|TERMINATED)
        unknown=0 pending=0
        say "the slice is $state: deleting it, to create it again"
        delete_slice_now || say "warning: deleting the $state slice failed"
        recreate=1 slice_gone=1
        continue ;;
      NOT_FOUND)
        unknown=0 pending=0 slice_gone=1
        if [[ $spot -eq 0 ]]; then
          say "the slice $name no longer exists (deleted by someone else?); nothing to follow"
          return 1
        fi
        recreate=1
        continue ;;
      UNKNOWN) unknown=$((unknown + 1)) ;;
      *) unknown=0 ;;   # CREATING, STARTING, RESTARTING, REPAIRING...: wait
    esac
    if [[ $unknown -ge 10 ]]; then
      say "neither the slice nor its workers answered 10 polls in a row; giving up (the job may still run)"
      return 1
    fi
    sleep "$poll"
  done
}

# finish RC: the end of a followed job: the log back, the slice deleted (unless --keep).
finish() {
  local rc=$1
  trap - EXIT INT TERM HUP
  copy_log_back
  if [[ $keep -eq 1 ]]; then
    say "--keep: leaving TPU $name in $zone running; delete it with:"
    show "${tpu[@]}" delete "$name" "${gcloud_common[@]}" --quiet >&2
  elif [[ $slice_gone -eq 1 ]]; then
    say "the slice is already gone"
  else
    delete_slice_now || rc=$?
  fi
  if [[ $rc -ne 0 ]]; then say "training failed (exit $rc); log in $logs_dir"; fi
  exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# --stop

if [[ $mode == stop ]]; then
  run "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=all --command="$stop_cmd" \
    || say "warning: the stop did not reach every worker; waiting for those it reached"
  if [[ $dry_run -eq 1 ]]; then
    say "then, every few seconds until no worker runs: every worker's job:"
    ssh_all "$status_cmd" || true
    finish 0
  fi
  waited=0
  while true; do
    lines=$(worker_statuses)
    if [[ -n $lines ]] && ! grep -q ' running ' <<<"$lines"; then break; fi
    if [[ $waited -ge $stop_timeout ]]; then
      say "no saved step after --stop-timeout=$stop_timeout s; leaving the slice as it is:"
      printf '%s\n' "$lines" >&2
      exit 1
    fi
    sleep "$((poll < 5 ? poll : 5))"
    waited=$((waited + (poll < 5 ? poll : 5)))
  done
  printf '%s\n' "$lines" >&2
  stop_rc=0
  if grep -q ' failed ' <<<"$lines"; then stop_rc=1; fi
  saved=$(awk '$2 == 0 && $3 == "stopped" {print $5}' <<<"$lines")
  if [[ -n $saved ]]; then
    say "stopped: step $saved saved to the workdir"
  else
    say "no worker reports a saved stop (finished earlier, or not running); see the log"
  fi
  finish "$stop_rc"
fi

# ---------------------------------------------------------------------------------------------
# --attach

if [[ $mode == attach ]]; then
  if [[ $dry_run -eq 0 ]] && ! "${tpu[@]}" describe "$name" "${gcloud_common[@]}" \
      --format='value(state)' >/dev/null; then
    say "error: no TPU $name in $zone to attach to"
    exit 1
  fi
  trap 'attach_hint; exit 130' INT
  trap 'attach_hint; exit 143' TERM
  trap 'exit 129' HUP
  supervise_rc=0
  supervise || supervise_rc=$?
  finish "$supervise_rc"
fi

# ---------------------------------------------------------------------------------------------
# The launch.

# Until the job runs, any exit deletes the slice (unless --keep); after that, an interrupted
# script leaves the job and the slice running for --attach / --stop.
job_started=0
# shellcheck disable=SC2317  # invoked by the EXIT trap
on_exit() {
  local rc=$?
  trap - EXIT
  if [[ $job_started -eq 1 ]]; then
    attach_hint
  elif [[ $keep -eq 1 ]]; then
    say "--keep: leaving TPU $name in $zone running; delete it with:"
    show "${tpu[@]}" delete "$name" "${gcloud_common[@]}" --quiet >&2
  else
    delete_slice_now || rc=$?
  fi
  exit "$rc"
}

create_slice
# Only now: a failed create (e.g. the name is taken) must not delete somebody else's slice.
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

install_and_check

if [[ $preflight -eq 1 ]]; then
  preflight_rc=0
  run "${tpu[@]}" ssh "$name" "${gcloud_common[@]}" --worker=0 \
    --command="$preflight_cmd" || preflight_rc=$?
  if [[ $preflight_rc -ne 0 ]]; then
    printf '%s: preflight failed (exit %d): the config cannot train on %s as it is; see the table\n' \
      "$PROG" "$preflight_rc" "$accelerator_type" >&2
    printf '%s: above (or ~/%s on worker 0); --skip-preflight launches anyway\n' "$PROG" \
      "$preflight_log" >&2
    exit "$preflight_rc"
  fi
fi

start_job
job_started=1
supervise_rc=0
supervise || supervise_rc=$?
finish "$supervise_rc"
