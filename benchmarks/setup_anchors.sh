#!/usr/bin/env bash
# Build what `make bench` needs besides the project's own .venv, all of it outside the repository:
#
#   $BENCH_VENVS/trl116    TRL 1.16.0: the SFT and RM anchors, the plain-torch ceiling, the peak-FLOP
#                          probe, and the workload generator (benchmarks/anchors/requirements-trl116.txt)
#   $BENCH_VENVS/trl029    TRL 0.29.1, the last release with a PPOTrainer: the PPO anchor
#                          (benchmarks/anchors/requirements-trl029.txt)
#   $RLHF_BENCH_DIR        the workload (benchmarks/workload.py), checked against benchmarks/workload.sha256
#
# Defaults: ~/.cache/rlhf-bench/venvs and ~/.cache/rlhf-bench/workload. `make bench-setup` runs this.
# TRL is never a dependency of rlhf and never enters .venv: the anchors get venvs of their own.
#
# Idempotent: a venv whose requirements file is unchanged since it was built, and a workload whose
# files still match, are left alone, so a second run takes seconds. Changing a pin rebuilds that venv.
# pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, a pip.conf) decide where torch comes from.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venvs=${BENCH_VENVS:-$HOME/.cache/rlhf-bench/venvs}
workload=${RLHF_BENCH_DIR:-$HOME/.cache/rlhf-bench/workload}
python=${PYTHON:-python3}

# trl 1.16 needs Python 3.11 or newer; say so now rather than after a failed resolve.
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bench-setup: the anchors need Python >= 3.11 (trl 1.16); $python is $("$python" -V 2>&1 || echo missing). Pass PYTHON=python3.11" >&2
  exit 2
fi

build_venv() {  # $1: the venv's name, which also names its requirements file
  local venv="$venvs/$1" requirements="$here/anchors/requirements-$1.txt"
  # The stamp is a copy of the requirements file the venv was built from, written only after the
  # install and an import check succeeded: an interrupted build is never mistaken for a finished one.
  local stamp="$venv/rlhf-bench-requirements.txt"
  if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
    echo "bench-setup: $venv is up to date"
    return
  fi
  echo "bench-setup: building $venv (a few minutes) ..."
  mkdir -p "$venvs"
  "$python" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$requirements"
  "$venv/bin/python" -c "import accelerate, datasets, torch, transformers, trl"
  "$venv/bin/python" -m pip freeze > "$venv/rlhf-bench-freeze.txt"  # what was really installed, for the record
  cp "$requirements" "$stamp"
}

build_venv trl116
build_venv trl029

mkdir -p "$(dirname "$workload")"
# Generates only when the workload is missing or is not the published one, then checks every file
# against benchmarks/workload.sha256 and names the first that differs (exit 2).
"$venvs/trl116/bin/python" "$here/workload.py" --out "$workload"
echo "bench-setup: venvs in $venvs, workload in $workload"
