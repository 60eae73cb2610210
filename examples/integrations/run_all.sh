#!/usr/bin/env bash
# Every Apex-era library integration, each run unchanged through `python -m ampcompat run`, O1 and O2:
# transformers' Trainer at 4.45.2 (metadata check) and 4.28.1 (find_spec check), Lightning 1.9.5,
# timm's ApexScaler path, DeepSpeed 0.17.6's "amp" block. Run from the repository root on a GPU machine:
#
#     bash examples/integrations/run_all.sh
#
# Library versions come as wheels from $WHL/<lib-version>/ (default .whl), each set installed into its own
# /tmp/site-<lib-version>; timm is the machine's own. One log per run goes to $OUT (default
# /tmp/integrations); a summary table is printed at the end and saved as $OUT/summary.txt.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/integrations}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
HERE=examples/integrations
ROWS=()

site() {  # install the wheel set $1 once; print its directory
    local dir=/tmp/site-$1
    if [ ! -d "$dir" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$dir" "$WHL/$1"/*.whl \
            > "$OUT/install-$1.log" 2>&1 || echo "installing $1 failed: see $OUT/install-$1.log" >&2
    fi
    echo "$dir"
}

run() {  # run LABEL SITE_DIR SCRIPT ARGS...
    local label=$1 dir=$2 log="$OUT/$1.log"
    shift 2
    echo "=== $label" >&2
    PYTHONPATH="${dir:+$dir:}$PWD" timeout 280 python3 -m ampcompat run "$@" > "$log" 2>&1
    local rc=$?
    local losses apex result
    losses=$(grep -E '^step [0-9]+ loss' "$log" | awk '{printf "%s ", $4}')
    apex=$(grep -m1 '^apex in use' "$log" | cut -c14-150)
    result=$(grep -m1 '^RESULT' "$log" | cut -d' ' -f2)
    ROWS+=("$(printf '%-22s | %-3s | %-4s | %-38s | %s' "$label" "$rc" "${result:-FAIL}" "$losses" "$apex")")
    tail -n 4 "$log" >&2
}

T445=$(site transformers-4.45.2)
T428=$(site transformers-4.28.1)
PL=$(site pytorch-lightning-1.9.5)
DS=$(site deepspeed-0.17.6)
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"

for level in O1 O2; do
    run "hf-4.45.2-$level" "$T445" "$HERE/hf_trainer.py" --opt-level $level --optim adamw_apex_fused \
        --output-dir /tmp/hf-$level
    run "hf-4.28.1-$level" "$T428" "$HERE/hf_trainer.py" --opt-level $level --optim adamw_apex_fused \
        --output-dir /tmp/hf-$level --tokenizers-pin-off
    run "lightning-1.9.5-$level" "$PL" "$HERE/lightning_apex.py" --opt-level $level
    run "timm-$level" "" "$HERE/timm_apex.py" --opt-level $level
    run "deepspeed-0.17.6-$level" "$DS" "$HERE/deepspeed_amp.py" --opt-level $level
done

{
    printf '%-22s | %-3s | %-4s | %-38s | %s\n' run rc res "loss per step" "apex in use"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.txt"
