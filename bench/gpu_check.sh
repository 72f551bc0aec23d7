#!/usr/bin/env bash
# The GPU checks of jetmoe-ft in one run of at most 8 minutes, one JSON line per check on stdout:
# flash-attn vs SDPA logits, padding-free exactness, 4-bit load + LoRA step, moe_backend grouped_mm vs loop
# in bf16 (forward, backward, expert LoRA), and training tokens/s + peak memory of ours vs transformers'
# JetMoe on a ~1B-parameter JetMoE (bf16, batch 8 x 2048). What each check compares: bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                  # on a CUDA machine: installs the pinned packages, then checks
#   WHEELS=DIR bash bench/gpu_check.sh       # offline: installs from the wheels in DIR (pip download them)
#   bash bench/gpu_check.sh --dry-run        # the same checks on CPU with a tiny model; installs nothing
#   bash bench/gpu_check.sh --checks padding_free,backend_parity
#
# It keeps the machine's CUDA build of torch (pip is constrained to it). flash-attn has no wheel on PyPI and
# its source build takes far longer than this run: it is installed only from a wheel (WHEELS=DIR), else
# the flash-attn checks say `skipped`. Exit status: 0 all ok or skipped, 1 a check failed, 2 no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_SECONDS:-480}
PINS=(transformers==5.24.0 peft==0.21.2 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 bitsandbytes==0.50.2)
FLASH_ATTN=flash-attn==2.8.3.post2
start=$SECONDS

json_line() {  # check status message
  "$PYTHON" -c 'import json, sys; print(json.dumps({"check": sys.argv[1], "status": sys.argv[2], "error": sys.argv[3]}))' "$@"
}

has_cuda() {
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

unmet_pins() {  # the pins whose exact version is not installed
  "$PYTHON" - "${PINS[@]}" <<'EOF'
import importlib.metadata
import sys

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if importlib.metadata.version(name) == version:
            continue
    except importlib.metadata.PackageNotFoundError:
        pass
    print(pin)
EOF
}

install() {  # pinned packages, torch untouched; pip's own output goes to stderr
  local source=() constraint missing
  if [[ -n ${WHEELS:-} ]]; then source=(--no-index --find-links "$WHEELS"); fi
  constraint=$(mktemp)
  "$PYTHON" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$constraint"
  mapfile -t missing < <(unmet_pins)
  if ((${#missing[@]})); then
    if ! timeout 240 "$PYTHON" -m pip install -q "${source[@]}" -c "$constraint" "${missing[@]}" >&2; then
      json_line install error "pip could not install ${missing[*]}: give WHEELS=DIR with their wheels"
    fi
  fi
  if ! "$PYTHON" -c 'import flash_attn' 2>/dev/null; then
    timeout 120 "$PYTHON" -m pip install -q "${source[@]}" -c "$constraint" --only-binary=:all: "$FLASH_ATTN" >&2 ||
      echo "gpu_check: no wheel of $FLASH_ATTN to install; the flash-attn checks will say skipped" >&2
  fi
  rm -f "$constraint"
}

dry_run=0
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then dry_run=1; fi
done
if ((dry_run == 0)); then
  if ! has_cuda; then
    json_line environment fail "no CUDA device: bench/gpu_check.sh needs an NVIDIA GPU and a CUDA build of torch (bash bench/gpu_check.sh --dry-run is the CPU smoke test)"
    exit 2
  fi
  install
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
left=$((BUDGET_S - (SECONDS - start)))
# no check starts in the last 2 minutes: the throughput check, last, takes about that long
status=0
timeout --kill-after=10 "$left" "$PYTHON" bench/gpu_check.py --budget-s $((left > 240 ? left - 120 : left / 2)) "$@" || status=$?
if ((status == 124 || status == 137)); then
  json_line run error "stopped at the ${BUDGET_S}-second limit; the checks not printed above did not finish"
fi
exit "$status"
