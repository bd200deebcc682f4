#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md ("On an H200") as one script, for a short lease on a GPU machine:
#
#   bash benchmarks/gpu_session.sh [SECONDS] [PHASE ...]
#
# SECONDS (default 540) is the script's whole budget: every phase runs under `timeout`, and the
# last one (cappa) gets what is left. PHASES (default: all, in this order):
#   env        GPU, driver, torch; carried wheels (.whl/*.whl) installed into /tmp/site first: on
#              a machine with torch and transformers but no network (the 2026-12-04 H200), the
#              rest of vlscale's needs as cp312 wheels: webdataset, braceexpand; deepspeed (built
#              with `pip wheel --no-deps deepspeed`), hjson, pydantic, pydantic-core,
#              annotated-types, typing-inspection; datasets, dill, multiprocess (vlm phase)
#   doctor     `vlscale doctor`: devices, bf16 matmul TFLOP/s, flash-attn, all-reduce
#   attention  benchmarks/cuda_attention.py: the attention entry point vs float64, its kernels,
#              packed rows' cost
#   hf         benchmarks/models_vs_hf.py at Qwen2.5-0.5B's shape, bf16: ours vs transformers
#   siglip     benchmarks/siglip_b16_synthetic.yaml (siglip_cc3m's shapes), 30 bf16 steps under
#              ddp, fsdp, zero2, zero3: loss, model TFLOP/s, MFU, memory vs `vlscale plan`
#   vlm        benchmarks/siq_vl_synthetic.yaml (SiQ-VL's shapes, packed rows), 20 bf16 steps,
#              ddp and fsdp
#   cappa      tiny_cappa + LocCa at 96 px (BENCHMARKS.md's CPU bound for issue 17) for as many
#              steps as the budget leaves, the linear probe every 1,000 steps
# Output: everything in $OUT (the device tool's folder; default runs/gpu_session): log (all of
# it), and results.tgz (every phase's JSON and metrics.jsonl).
set -u
BUDGET=${1:-540}
shift $(( $# > 0 ? 1 : 0 ))
PHASES=${*:-env doctor attention hf siglip vlm cappa}
OUT=${OUT:-runs/gpu_session}
RES=$OUT/results
mkdir -p "$RES"
LOG=$OUT/log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
VLSCALE="$PY -m launch.cli"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET - SECONDS)); }
# phase NAME LIMIT CMD...: run CMD under min(LIMIT, what is left - 10 s), log its wall time and rc.
phase() {
    local name=$1 limit=$2
    shift 2
    local cap=$(($(left) - 10))
    ((cap < limit)) && limit=$cap
    if ((limit < 15)); then
        echo "=== $name: skipped, $(left) s left"
        return 0
    fi
    echo "=== $name (limit ${limit}s, t=${SECONDS}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: rc $? in $((SECONDS - start)) s"
}

for p in $PHASES; do
    case $p in
    env)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        if compgen -G ".whl/*.whl" >/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl || echo "wheel install failed"
        fi
        $PY -c "import torch, transformers, pyarrow; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__)"
        $PY -c "import flash_attn" 2>/dev/null && echo "flash-attn importable" ||
            echo "flash-attn not installed"
        ;;
    doctor)
        phase doctor 120 $VLSCALE doctor --json "$RES/doctor.json"
        ;;
    attention)
        phase attention 120 $PY benchmarks/cuda_attention.py --json "$RES/attention.json"
        ;;
    hf)
        phase hf 150 $PY benchmarks/models_vs_hf.py --device cuda --dtype bfloat16 --layers 24 \
            --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936 --seq 2048 \
            --batch 8 --iters 10
        ;;
    siglip)
        test -f data/shapes224/sizes.json ||
            phase shapes224 60 $VLSCALE shards synthetic --out data/shapes224 --train 16384 \
                --val 512 --seed 0 --image-size 224
        for engine in ddp fsdp zero2 zero3; do
            phase "siglip-$engine" 90 $VLSCALE doctor --steps 30 \
                --json "$RES/siglip-$engine.json" benchmarks/siglip_b16_synthetic.yaml \
                engine.kind=$engine
        done
        ;;
    vlm)
        test -f data/vqa384/shapes_colour/sizes.json || {
            phase vqa384-src 90 $VLSCALE shards synthetic-vqa --out data/vqa384_src --train 1000 \
                --val 50 --image-size 384 >/dev/null
            phase vqa384 90 $VLSCALE shards finevision --source data/vqa384_src --out data/vqa384 \
                --val-samples 50 --shard-size 250 --subsets shapes_colour,shapes_shape,\
shapes_count,shapes_position,shapes_caption,shapes_multiturn,shapes_text,shapes_two_images \
                >/dev/null
        }
        for engine in ddp fsdp; do
            # 64 samples a step (about 4 rows of 2,048): the 2026-12-04 run kept the recipe's 8,
            # a step too small to measure MFU by (BENCHMARKS.md)
            phase "vlm-$engine" 150 $VLSCALE doctor --steps 20 --json "$RES/vlm-$engine.json" \
                benchmarks/siq_vl_synthetic.yaml engine.kind=$engine data.batch_size=64
        done
        ;;
    cappa)
        test -f data/shapes96/sizes.json ||
            phase shapes96 60 $VLSCALE shards synthetic --out data/shapes96 --train 20000 \
                --val 512 --seed 0 --image-size 96
        P='train: "data/shapes96/train-{000000..000009}.tar"'
        P="$P, val: \"data/shapes96/train-{000010..000019}.tar\""
        phase cappa 3600 $VLSCALE train tiny_cappa run_dir="$RES/cappa96" \
            model.vision_config.image_size=96 model.vision_config.patch_size=16 \
            model.tokenizer=data/shapes96/tokenizer \
            'data.train=data/shapes96/train-{000000..000019}.tar' \
            data.val=data/shapes96/val-000000.tar data.num_workers=6 \
            'task.decoder_tasks={caption: 1, referring: 1, grounded: 1}' optim.max_steps=${CAPPA_STEPS:-12000} \
            eval.every=${CAPPA_EVAL:-1000} checkpoint.every=0 logging.wandb.mode=disabled logging.every=100 \
            "eval.evaluators=[{linear_probe: {$P, train_samples: 2048, val_samples: 1000}}]"
        grep -h probe "$RES/cappa96/metrics.jsonl" 2>/dev/null | cut -c1-300
        rm -rf "$RES"/cappa96/checkpoints
        ;;
    *) echo "unknown phase $p" ;;
    esac
done
tar czf "$OUT/results.tgz" -C "$RES" . && echo "results.tgz written ($(left) s left)"
