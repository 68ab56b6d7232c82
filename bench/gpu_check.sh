#!/usr/bin/env bash
# One device call: install the carried wheels (TRL, datasets, rouge-score and what the GPU image lacks of their
# needs), then run bench/gpu_check.py on CUDA. Results: $OUT/gpu_check.json, $OUT/gpu_check.log (the script's
# lines), $OUT/gpu_check_stdout.log (everything printed), $OUT/pip.log, $OUT/nvidia-smi.txt.
#
#   run(command="bash bench/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=420)
#
# The carried folder (about 7 MiB; ignored by git) is built once where PyPI is reachable:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu_wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nltk defusedxml
#   pip wheel --no-deps -w .gpu_wheels rouge-score==0.1.2          # no wheel on PyPI
#   mkdir .gpu_wheels/tokenizer && cp $(retmask fetch-model)/{tokenizer.json,tokenizer_config.json,chat_template.jinja} \
#       .gpu_wheels/tokenizer/   # the embedded model's tokenizer files only, no weights
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
SITE=/tmp/gpu_check_site

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# --target: the image's site-packages may be read-only; PYTHONPATH puts these before it
if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu_wheels/*.whl >"$OUT/pip.log" 2>&1; then
    echo "wheel install failed:" && tail -20 "$OUT/pip.log"
    exit 1
fi
$PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|pyarrow|fsspec|huggingface[-_]hub|tokenizers|tqdm|pandas) ' \
    >>"$OUT/pip.log"

export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RETMASK_HOME=/tmp/retmask_home
# the script skips what would not fit in --budget-s; the timeout only catches a hang
timeout -k 10 330 $PY bench/gpu_check.py --device cuda --budget-s 240 "$@" 2>&1 | tee "$OUT/gpu_check_stdout.log"
rc=${PIPESTATUS[0]}
echo "gpu_check exit code $rc"
exit "$rc"
