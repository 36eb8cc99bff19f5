#!/usr/bin/env bash
# The scaling tables of docs/PERFORMANCE.md: examples/bench.rs and its Python
# twin over rank, width, layer count and tokens, one configuration after the
# other on the same machine. Not run by CI. Needs a built release example
# (cargo build --release --example bench) and a Python with torch,
# transformers and peft (PYTHON, default python3).
#
#   benches/sweep.sh > sweep.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH=target/release/examples/bench
STEPS=${STEPS:-3}

run() { # label, then the flags both benches take
    local label=$1
    shift
    local rust py
    rust=$("$BENCH" --threads 2 --steps "$STEPS" "$@")
    py=$("$PYTHON" benches/pytorch_peft.py --threads 2 --steps "$STEPS" "$@" 2>/dev/null)
    for side in rust py; do
        local out=${!side}
        # tokens/s of: forward base, unmerged, merged, training step; peak MiB through training
        local base unm mer train peak
        base=$(grep "forward, base" <<<"$out" | awk '{print $3}')
        unm=$(grep "forward, LoRA unmerged" <<<"$out" | awk '{print $4}')
        mer=$(grep "forward, LoRA merged" <<<"$out" | awk '{print $4}')
        train=$(grep "training step" <<<"$out" | awk '{print $3}')
        peak=$(grep "peak resident memory" <<<"$out" | awk '{print $4}')
        echo "| $label | $side | $base | $unm | $mer | $train | $peak |"
    done
}

echo "| case | impl | forward base tok/s | unmerged tok/s | merged tok/s | training tok/s | peak MiB |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
for r in 4 16 64 256; do run "rank $r" --rank "$r"; done
for h in 256 1024 2048 4096; do
    run "width $h (2 layers, 2x128 tokens)" --hidden "$h" --intermediate $((h * 11 / 4)) --heads $((h / 64)) \
        --layers 2 --batch 2 --seq 128
done
for l in 1 2 8; do run "layers $l" --layers "$l"; done
for bs in "1 128" "8 128" "4 512"; do
    set -- $bs
    run "tokens $1x$2" --batch "$1" --seq "$2"
done
