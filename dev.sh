#!/usr/bin/env bash
# One entry point for people and CI. Each command but test-a1111 sets up ./.venv first (pip, fully
# pinned by requirements/constraints.txt, torch held at the CPU build so no CUDA wheels are pulled).
#
#   ./dev.sh demo [ARGS]     encode sample images, decode them back, save them with metadata
#   ./dev.sh test [ARGS]     lint (ruff) and run the test suite (pytest ARGS) on every core
#                            (pytest-xdist -n auto; VAEBATCH_TEST_WORKERS=N or ARGS -n 0 to change it)
#   ./dev.sh bench [ARGS]    run the decode throughput benchmark (bench/bench_decode.py ARGS)
#   ./dev.sh py ARGS         run the venv's python (e.g. ./dev.sh py -m lib_vaebatch --help)
#   ./dev.sh setup           only create/refresh the environment
#   ./dev.sh setup-gradio4   also create .venv-gradio4 (gradio 4.40, Forge's UI stack) for its tests
#   ./dev.sh setup-a1111     only create/refresh .venv-a1111 (see test-a1111)
#   ./dev.sh test-a1111 [ARGS]
#                            the suite on A1111 1.10.1's own stack (Python 3.10, torch 2.1.2 CUDA build
#                            run on the CPU, gradio 3.41.2, pydantic 1; requirements/constraints-a1111.txt)
#                            in .venv-a1111 (~5 GB, a few minutes the first time), pytest ARGS; the browser
#                            and gradio 4 tests are left to `test`. Python 3.10 from $PYTHON310, else
#                            python3.10 on PATH, else pyenv's; an error if there is none (no skipping).
#   ./dev.sh gpu-check [ARGS] on a CUDA machine: gpu tests + GPU benchmark with PASS/FAIL verdicts
#                            (bench/gpu_check.py; exit 3 at once where there is no CUDA device)
#   ./dev.sh mutate PATH... [--tests T...]
#                            mutation testing (mutmut) of the named modules with the tests that cover
#                            them (tests/mutate.py; installs mutmut into .venv on first use);
#                            ./dev.sh mutate --report shows the last run's counts and survivors
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VAEBATCH_VENV:-.venv}"
CONSTRAINTS=requirements/constraints.txt

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for c in python3.11 python3.12 python3; do  # the pins need 3.11+ (3.10: test-a1111)
        if command -v "$c" >/dev/null 2>&1; then echo "$c"; return; fi
    done
    echo "dev.sh: no python3 found" >&2; exit 1
}

setup() {
    local want stamp="$VENV/.vaebatch-stamp"
    want=$(cat "$CONSTRAINTS" pyproject.toml | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py; py=$(pick_python)
        "$py" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' \
            || { echo "dev.sh: need Python 3.11 or 3.12 (A1111's 3.10: ./dev.sh test-a1111), found $("$py" --version)" >&2; exit 1; }
        echo "[dev.sh] creating $VENV with $py" >&2
        "$py" -m venv "$VENV"
    fi
    echo "[dev.sh] installing pinned dependencies into $VENV" >&2
    PIP_CONSTRAINT="$PWD/$CONSTRAINTS" "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -e ".[dev,ray]"
    echo "$want" >"$stamp"
}

setup_gradio4() {
    local venv=.venv-gradio4 c=requirements/constraints-gradio4.txt want
    want=$(sha256sum "$c" | cut -c1-16)
    if [ -f "$venv/.vaebatch-stamp" ] && [ "$(cat "$venv/.vaebatch-stamp")" = "$want" ]; then return 0; fi
    [ -x "$venv/bin/python" ] || "$(pick_python)" -m venv "$venv"
    echo "[dev.sh] installing gradio 4.40 into $venv" >&2
    PIP_CONSTRAINT="$PWD/$c" "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        torch gradio numpy pillow piexif safetensors
    echo "$want" >"$venv/.vaebatch-stamp"
}

pick_python310() {
    local c cands=()
    if [ -n "${PYTHON310:-}" ]; then
        cands=("$PYTHON310")
    else
        command -v python3.10 >/dev/null 2>&1 && cands+=(python3.10)
        for c in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.10.*/bin/python; do
            [ -x "$c" ] && cands+=("$c")
        done
    fi
    for c in "${cands[@]}"; do
        if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
            echo "$c"; return
        fi
    done
    echo "dev.sh: test-a1111 needs Python 3.10 (A1111 1.10.1's) and found none${PYTHON310:+ at PYTHON310=$PYTHON310};" \
        "set PYTHON310=/path/to/python3.10 or install one (e.g. pyenv install 3.10)" >&2
    exit 1
}

setup_a1111() {
    local venv=.venv-a1111 c=requirements/constraints-a1111.txt want py
    want=$(cat "$c" pyproject.toml | sha256sum | cut -c1-16)
    if [ -f "$venv/.vaebatch-stamp" ] && [ "$(cat "$venv/.vaebatch-stamp")" = "$want" ]; then return 0; fi
    if [ ! -x "$venv/bin/python" ]; then
        py=$(pick_python310)
        echo "[dev.sh] creating $venv with $py" >&2
        "$py" -m venv "$venv"
    fi
    echo "[dev.sh] installing A1111 1.10.1's stack into $venv" >&2
    PIP_CONSTRAINT="$PWD/$c" "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$want" >"$venv/.vaebatch-stamp"
}

# A CUDA device, seen without importing torch (the CPU venv's torch cannot tell a GPU exists).
has_nvidia_device() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then return 0; fi
    compgen -G '/dev/nvidia[0-9]*' >/dev/null
}

# .venv-gpu: the same pins, but torch as the CUDA build of the same version from the default index.
setup_gpu() {
    local venv="${VAEBATCH_GPU_VENV:-.venv-gpu}" c=requirements/constraints-gpu.txt want
    want=$(cat "$c" pyproject.toml | sha256sum | cut -c1-16)
    if [ -f "$venv/.vaebatch-stamp" ] && [ "$(cat "$venv/.vaebatch-stamp")" = "$want" ]; then return 0; fi
    [ -x "$venv/bin/python" ] || "$(pick_python)" -m venv "$venv"
    echo "[dev.sh] installing the CUDA torch build and pinned dependencies into $venv" >&2
    PIP_CONSTRAINT="$PWD/$c" "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
    "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
        || { echo "dev.sh: $venv got a torch without CUDA ($("$venv/bin/python" -c 'import torch; print(torch.__version__)'))" >&2; exit 1; }
    echo "$want" >"$venv/.vaebatch-stamp"
}

gpu_check() {
    local started; started=$(date +%s.%N)
    for a in "$@"; do
        if [ "$a" = "--dry-run" ]; then setup; exec "$VENV/bin/python" bench/gpu_check.py "$@"; fi
    done
    if ! has_nvidia_device; then
        echo "gpu-check: no CUDA device (no nvidia-smi GPU, no /dev/nvidia*); nothing was installed or run" >&2
        exit 3
    fi
    setup_gpu
    exec "${VAEBATCH_GPU_VENV:-.venv-gpu}/bin/python" bench/gpu_check.py --started "$started" "$@"
}

cmd="${1:-}"; [ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    setup-gradio4) setup_gradio4 ;;
    demo) setup; exec "$VENV/bin/python" -m lib_vaebatch demo "$@" ;;
    test)
        setup
        "$VENV/bin/python" -m ruff check .
        "$VENV/bin/python" -m ruff format --check .
        exec "$VENV/bin/python" -m pytest -n "${VAEBATCH_TEST_WORKERS:-auto}" "$@"
        ;;
    setup-a1111) setup_a1111 ;;
    test-a1111)
        setup_a1111
        exec .venv-a1111/bin/python -m pytest -n "${VAEBATCH_TEST_WORKERS:-auto}" \
            --ignore=tests/ui/test_browser.py --ignore=tests/ui/test_gradio4.py "$@"
        ;;
    bench) setup; exec "$VENV/bin/python" bench/bench_decode.py "$@" ;;
    gpu-check) gpu_check "$@" ;;
    mutate)
        setup
        "$VENV/bin/python" -c 'import mutmut' 2>/dev/null \
            || PIP_CONSTRAINT="$PWD/$CONSTRAINTS" "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[mutate]"
        exec "$VENV/bin/python" tests/mutate.py "$@"
        ;;
    py) setup; exec "$VENV/bin/python" "$@" ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
esac
