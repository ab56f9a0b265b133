#!/usr/bin/env bash
# The GPU check in one call, on a machine with one CUDA GPU, torch installed and no internet
# (benchmarks/README.md says how to run it there):
#
#     bash benchmarks/gpu_check.sh WHEELS_DIR OUT_DIR [--tiny]
#
# 1. installs WHEELS_DIR/*.whl (`make gpu-wheels` fills .whl; an empty folder installs nothing)
#    and skinaug itself from this source tree, without dependencies or an index, into a temporary
#    site folder put first on PYTHONPATH;
# 2. `skinaug gpu-check OUT_DIR`: every GPU stage once at paper settings (src/skinaug/bench/gpucheck.py);
# 3. `skinaug bench --out-dir OUT_DIR`: every row of the benchmark (src/skinaug/bench/speed.py).
# The smoke runs first: it is short, so its figures come back even if the bench overruns a time limit.
# OUT_DIR gets gpu_check.log (everything printed), gpu_check.json and the bench's {date}_{card}.json.
# --tiny passes to both: the tiny model, minutes on a CPU. PYTHON names the interpreter (python3).
# Exit status: 0 when both succeed, else 1 (2: bad arguments).
set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh WHEELS_DIR OUT_DIR [--tiny]"
if [ $# -lt 2 ] || [ $# -gt 3 ] || { [ $# -eq 3 ] && [ "$3" != --tiny ]; }; then
  echo "Error: $usage" >&2
  exit 2
fi
if [ ! -d "$1" ]; then
  echo "Error: wheels folder $1 not found; make it with \`make gpu-wheels\` (an empty folder installs nothing)" >&2
  exit 2
fi
wheels=$(cd "$1" && pwd)
mkdir -p "$2" && out=$(cd "$2" && pwd) || { echo "Error: cannot create OUT_DIR $2" >&2; exit 2; }
tiny=${3:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

check() {
  local site
  site=$(mktemp -d "${TMPDIR:-/tmp}/skinaug-site.XXXXXX") || return 1
  trap 'rm -rf "$site"' RETURN
  echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); wheels $wheels, results $out ${tiny}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  local found=("$wheels"/*.whl)
  [ -e "${found[0]}" ] || found=()
  echo "== installing ${#found[@]} wheel(s) and skinaug (no index, no dependencies) into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target "$site" "${found[@]}" "$root" || { echo "Error: the install failed (see above)"; return 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  "$python" -c 'import importlib.metadata as m, sys
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "torchvision", "diffusers",
      "transformers", "peft", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "skinaug")))' || return 1
  cd "$root" || return 1  # the paper profile is composed from ./conf
  local smoke=0 bench=0 started=$SECONDS
  echo "== skinaug gpu-check $out $tiny"
  "$site/bin/skinaug" gpu-check "$out" $tiny || smoke=$?
  echo "== skinaug bench --out-dir $out $tiny"
  "$site/bin/skinaug" bench --out-dir "$out" $tiny || bench=$?
  echo "== gpu_check: smoke exit $smoke, bench exit $bench, $((SECONDS - started)) s; results in $out"
  [ "$smoke" -eq 0 ] && [ "$bench" -eq 0 ]
}

check 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
