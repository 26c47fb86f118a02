#!/usr/bin/env bash
# Train idm_jax on a Cloud TPU slice (single host or pod): create the slice, install the package on
# every worker, compile the training step for the slice's topology on worker 0 as a preflight
# (python -m idm_jax.aot; --skip-preflight to skip), run the same training command on all workers
# at once, copy worker 0's log back and delete the slice (unless --keep). See launch/README.md.
#
#   launch/tpu_pod.sh --name idm-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#     --version tpu-ubuntu2204-base --repo https://github.com/ME/idm_jax.git \
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
          [--python VERSION] [--logs-dir DIR] [--spot] [--keep] [--skip-preflight]
          [--dry-run] [-- --config.x=y ...]
EOF
}

usage() {
  synopsis
  cat <<EOF

Creates a Cloud TPU VM slice, installs idm_jax on every worker, compiles the training step for
the slice's topology on worker 0 (python -m idm_jax.aot: a config that cannot run or does not
fit in HBM stops here, before training starts), trains on all workers at once
(python -m idm_jax.main), copies worker 0's log back and deletes the slice on exit.

required:
  --name NAME               TPU VM name (must not exist yet)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16
  --repo GIT_URL            git URL the workers clone (must be reachable from the workers)
  --workdir gs://...        checkpoints / logs / samples; a gs:// path all workers share

optional:
  --version RUNTIME         TPU VM runtime (default: $DEFAULT_VERSION; v5e: v2-alpha-tpuv5-lite)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --config FILE             config file inside the repo (default: $DEFAULT_CONFIG)
  --data-dir DIR            TFDS data_dir of a dataset made by idm_jax.data.prepare (gs://: every
                            worker reads its share straight from the bucket, nothing is staged);
                            adds --config.data.source=tfds --config.data.tfds_data_dir=DIR
                            (the dataset name comes from the config or --config.data.tfds_name=)
  --ref REF                 branch, tag or commit to check out (default: the repo's default)
  --python VERSION          Python the workers' virtualenv uses, via uv (default: $DEFAULT_PYTHON)
  --logs-dir DIR            where worker 0's log is copied (default: ./tpu_logs/NAME)
  --spot                    create a Spot (preemptible) slice
  --keep                    do not delete the slice when the script exits
  --skip-preflight          do not run the AOT compile check before training
  --dry-run                 print every command instead of running it
  -h, --help                this message

Everything after -- is passed to python -m idm_jax.main unchanged (e.g. --config.train.batch_size=64).
EOF
}

DEFAULT_VERSION=tpu-ubuntu2204-base
DEFAULT_CONFIG=configs/ffhq.py
DEFAULT_PYTHON=3.12

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  synopsis >&2
  printf 'run %s --help for details\n' "$PROG" >&2
  exit 2
}

name="" zone="" accelerator_type="" version=$DEFAULT_VERSION project="" repo="" ref=""
config=$DEFAULT_CONFIG workdir="" data_dir="" python_version=$DEFAULT_PYTHON logs_dir=""
spot=0 keep=0 dry_run=0 preflight=1
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
    --name=*|--zone=*|--accelerator-type=*|--version=*|--project=*|--repo=*|--ref=*|--config=*|\
    --workdir=*|--data-dir=*|--python=*|--logs-dir=*)
      # --opt=value: split once and re-dispatch.
      opt=${1%%=*}; val=${1#*=}; shift; set -- "$opt" "$val" "$@" ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --skip-preflight) preflight=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option: $1 (training overrides go after --)" ;;
  esac
done

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ -n $accelerator_type ]] || die "--accelerator-type is required"
[[ -n $repo ]] || die "--repo is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ $workdir == gs://* ]] || die "--workdir must be a gs:// path (every worker writes checkpoints to it)"
[[ -n $logs_dir ]] || logs_dir="./tpu_logs/$name"

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

# q ARG...: each argument quoted for the workers' bash (printf %q), joined by spaces.
q() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

gcloud_common=(--zone "$zone")
[[ -n $project ]] && gcloud_common+=(--project "$project")

# ---------------------------------------------------------------------------------------------
# Commands the workers run. Every value from the command line goes through q (printf %q).

# shellcheck disable=SC2016  # $HOME is meant to expand on the workers, not here
remote_repo='$HOME/idm_jax'
# shellcheck disable=SC2016
remote_venv='$HOME/idm_venv'
remote_log=idm_jax_train.log    # relative to the workers' home directory
preflight_log=idm_jax_preflight.log

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

train_cmd="set -o pipefail; cd $remote_repo"
train_cmd+="; $remote_venv/bin/python -m idm_jax.main $(q "${train_args[@]}")"
train_cmd+=" 2>&1 | tee \$HOME/$remote_log"

# ---------------------------------------------------------------------------------------------
# The run.

create_args=(gcloud compute tpus tpu-vm create "$name" "${gcloud_common[@]}"
             --accelerator-type "$accelerator_type" --version "$version")
[[ $spot -eq 1 ]] && create_args+=(--spot)

# shellcheck disable=SC2317  # invoked by the EXIT trap
delete_slice() {
  local rc=$?
  trap - EXIT
  if [[ $keep -eq 1 ]]; then
    printf '%s: --keep: leaving TPU %s in %s running; delete it with:\n' "$PROG" "$name" "$zone" >&2
    show gcloud compute tpus tpu-vm delete "$name" "${gcloud_common[@]}" --quiet >&2
  else
    run gcloud compute tpus tpu-vm delete "$name" "${gcloud_common[@]}" --quiet || rc=$?
  fi
  exit "$rc"
}

run "${create_args[@]}"
# Only now: a failed create (e.g. the name is taken) must not delete somebody else's slice.
trap delete_slice EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_common[@]}" --worker=all --command="$install_cmd"

if [[ $preflight -eq 1 ]]; then
  preflight_rc=0
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_common[@]}" --worker=0 \
    --command="$preflight_cmd" || preflight_rc=$?
  if [[ $preflight_rc -ne 0 ]]; then
    printf '%s: preflight failed (exit %d): the config cannot train on %s as it is; see the table\n' \
      "$PROG" "$preflight_rc" "$accelerator_type" >&2
    printf '%s: above (or ~/%s on worker 0); --skip-preflight launches anyway\n' "$PROG" \
      "$preflight_log" >&2
    exit "$preflight_rc"
  fi
fi

train_rc=0
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_common[@]}" --worker=all --command="$train_cmd" \
  || train_rc=$?

run mkdir -p "$logs_dir"
run gcloud compute tpus tpu-vm scp "$name:$remote_log" "$logs_dir/" "${gcloud_common[@]}" --worker=0 \
  || printf '%s: warning: could not copy the training log from worker 0\n' "$PROG" >&2

if [[ $train_rc -ne 0 ]]; then
  printf '%s: training failed (exit %d); log in %s\n' "$PROG" "$train_rc" "$logs_dir" >&2
fi
exit "$train_rc"
