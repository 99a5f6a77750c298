#!/usr/bin/env bash
# One-shot GPU check of flowsteer (run ONCE on a lent GPU machine, no network there):
#   bash bench/gpu_check.sh          # with the wheels of the missing packages in .whl/ (carry [".whl"])
# Parts (each under `timeout`, a failing part does not stop the others, the whole run ends in < 7 min):
#   a  nvidia-smi + versions + the imports flowsteer needs
#   b  bench/train_scale.py --device cuda: SD3-Medium-size student, batch 16: MFU eager vs compiled+fused
#      AdamW (train.compile; fused AdamW on CUDA), then compiled alone if time allows
#   c  the CLI end to end on a random-init SD3 pipeline dir (64x64x16 latents, 1024 wide, 6 blocks):
#      teacher -> generate -> train (perflow, ota, flowsteer; bf16; train.loader_workers 4: data wait and
#      GPU utilisation per method from losses.jsonl and nvidia-smi) -> evaluate -> report
#   d  bench/generate_throughput.py --device cuda (generate stage vs a bare sampling loop, toy teacher), and
#      bench/generate_scale.py --device cuda: SD3-Medium-size CFG forwards, generate MFU (eager, compiled)
#   e  (run right after a) bench/loader_device_check.py: 4 loader workers through the shared arena, page-locked,
#      side-stream copies; every batch equal to the in-process draw; data wait at a 100 ms device step
# Logs: $OUT/{a,b,c,d,e}.log, $OUT/summary.txt, $OUT/c_report.md, $OUT/c_losses.jsonl, $OUT/c_scores.csv
# Dry run on a CPU machine:
#   OUT=/tmp/gpucheck_out GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 SKIP_INSTALL=1 bash bench/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-5} HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
T0=$(date +%s)
DEV=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-abcde}         # which parts to run, e.g. "ac"
GC_METHODS=${GPU_CHECK_METHODS:-perflow, ota, flowsteer}
GC_PREFETCH=${GPU_CHECK_PREFETCH:-2}
GC_LOADER_WORKERS=${GPU_CHECK_LOADER_WORKERS:-4}
GC_COMPILE=${GPU_CHECK_COMPILE:-false}
SMALL=${GPU_CHECK_SMALL:-0}
if [ "$SMALL" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-1500}; else BUDGET=${GPU_CHECK_BUDGET:-400}; fi
OUT=${OUT:-/tmp/gpucheck_out}
W=${GPU_CHECK_WORK:-/tmp/gpucheck}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
rm -rf "$W" && mkdir -p "$W"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  PY=${PY:-/work/main/.venv/bin/python}
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  PY=python3
  timeout -k 5 150 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
echo "install: $(( $(date +%s) - T0 ))s; device $DEV; small $SMALL; budget ${BUDGET}s; python $PY"

left() { echo $(( T0 + BUDGET - $(date +%s) )); }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
note() {   # note PART RC SECONDS RESULT: one line of the summary table
  local r=$4; [ "$2" = 124 ] && r="TIMED OUT or skipped (no time left) $r"
  printf '%-22s %4s %8s  %s\n' "$1" "$2" "$3" "$r" | tee -a "$SUMMARY"
}
# limit CAP RESERVE: seconds a part may take: at most CAP, leaving RESERVE seconds for the parts after it
limit() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }

# run LOG SECONDS CMD...: CMD under timeout, stdout+stderr appended to LOG and shown; sets RC and DT
run() {
  local log=$1 secs=$2; shift 2
  local t=$(now)
  if [ "$secs" -lt 5 ]; then
    echo "skipped (out of time): $*" | tee -a "$log" "$W/last.log"; RC=124; DT=0; return
  fi
  echo "+ [timeout ${secs}s] $*" | tee -a "$log"
  : > "$W/last.log"
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log" "$W/last.log"
  RC=${PIPESTATUS[0]}
  DT=$(since "$t")
  echo "= rc $RC in ${DT}s" | tee -a "$log"
}

# GPU memory / utilisation sampled every 0.5 s while a command runs (cuda only)
smi_start() {   # the sampler is started detached (not a job of this shell) and ended by its pid
  SMI_PID=
  if [ "$DEV" != cpu ] && command -v nvidia-smi >/dev/null; then
    SMI_PID=$( (nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
                > "$W/smi_$1.csv" 2>/dev/null < /dev/null & echo $!) )
  fi
}
smi_stop() {   # prints "gpu peak N MiB, util mean M%" of the samples
  [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
  [ -s "$W/smi_$1.csv" ] && awk -F', *' '{ if ($1 > m) m = $1; u += $2; n++ } END { if (n) printf "gpu peak %d MiB, util mean %.0f%%", m, u / n }' "$W/smi_$1.csv"
}

echo "part                     rc     secs  result" | tee -a "$SUMMARY"

# ------------------------------------------------------------------ a: machine and imports
A=$OUT/a.log
if [ "$DEV" != cpu ]; then
  run "$A" 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  note "a nvidia-smi" "$RC" "$DT" "$(grep -v '^name' "$W/last.log" | head -1)"
fi
run "$A" "$(limit 60 200)" "$PY" -c "
import os, shutil, sys, torch, transformers, huggingface_hub, diffusers, zarr, numcodecs, pydantic, cleanfid, pipeline.cli, stages.train
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu')
print('diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| hub', huggingface_hub.__version__,
      '| zarr', zarr.__version__, '| numcodecs', numcodecs.__version__, '| pydantic', pydantic.__version__)
print('bf16 supported:', torch.cuda.is_bf16_supported() if torch.cuda.is_available() else 'n/a', '| cpus', os.cpu_count(),
      '| /tmp free %.0f GiB' % (shutil.disk_usage('/tmp').free / 2**30))
print('imports ok: diffusers zarr numcodecs pydantic cleanfid pipeline.cli stages.train')
"
note "a imports" "$RC" "$DT" "$(grep '^python' "$W/last.log" | tail -1 | cut -c1-110)"

# ------------------------------------------------------------------ e: the loader's device path (arena, page-locked)
E=$OUT/e.log
if [[ "$PARTS" != *e* ]]; then
  note "e" "-" "0" "not asked (GPU_CHECK_PARTS=$PARTS)"
else
  run "$E" "$(limit 60 300)" "$PY" bench/loader_device_check.py --device "$DEV" --workers 4 --steps 24 --step-ms 100
  note "e loader device check" "$RC" "$DT" "$(grep -o 'arena page-locked.*' "$W/last.log" | tail -1 | cut -c1-150)"
fi

# ------------------------------------------------------------------ b: SD3-Medium-size student step
B=$OUT/b.log
if [[ "$PARTS" != *b* ]]; then
  note "b" "-" "0" "not asked (GPU_CHECK_PARTS=$PARTS)"
elif [ "$SMALL" = 1 ]; then     # 2B params do not fit a CPU dry run: only check the bench's command line
  run "$B" 60 "$PY" bench/train_scale.py --help
  note "b train_scale --help" "$RC" "$DT" "(small mode: the 2B-param bench is not run)"
else
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  # batch 16 (measured 67.5 GiB eager: 32 GB fp32 weights+grads+AdamW, ~2 GiB activations a sample)
  smi_start b16
  run "$B" "$(limit 200 240)" "$PY" bench/train_scale.py --device "$DEV" --batch 16 --steps 10 \
    --variants eager,compiled+fused
  for v in eager compiled+fused; do
    note "b batch 16 $v" "$RC" "$DT" "$(grep "^\[$v\]" "$W/last.log" | grep -o 'step [0-9.]* s.*' | tail -1 | cut -c1-150)"
  done
  echo "  $(smi_stop b16)" | tee -a "$SUMMARY"
  if [ "$(left)" -gt 330 ]; then
    run "$B" "$(limit 120 240)" "$PY" bench/train_scale.py --device "$DEV" --batch 16 --steps 10 --variants compiled
    note "b batch 16 compiled" "$RC" "$DT" "$(grep -o 'step [0-9.]* s.*' "$W/last.log" | tail -1 | cut -c1-150)"
  else
    note "b batch 16 compiled" "-" "0" "skipped: $(left)s left"
  fi
  unset PYTORCH_CUDA_ALLOC_CONF
fi

# ------------------------------------------------------------------ c: the CLI end to end on an SD3 dir
C=$OUT/c.log
if [ "$SMALL" = 1 ]; then
  export GC_SAMPLE=16 GC_LAYERS=2 GC_HEADS=2 GC_VAE_LEVELS=2
  PROMPTS=48 PER_PROMPT=1 SHARD=16 GBATCH=16 M=8 STEPS=4 TBATCH=4 CKPT=2 LOGE=2 NSAMP=8 EBATCH=8
else
  export GC_SAMPLE=64 GC_LAYERS=6 GC_HEADS=16 GC_VAE_LEVELS=4     # 1024 wide, 512 px images
  PROMPTS=64 PER_PROMPT=4 SHARD=64 GBATCH=64 M=16 STEPS=${GPU_CHECK_STEPS:-100} TBATCH=16 LOGE=10 NSAMP=64 EBATCH=32
  CKPT=$STEPS
fi
C_END=$(( $(date +%s) + $(limit ${GPU_CHECK_C_SECONDS:-250} 25) ))
cleft() { echo $(( C_END - $(date +%s) )); }
run "$C" "$(cleft)" "$PY" - "$W" "$PROMPTS" <<'EOF'
"""A random-init StableDiffusion3Pipeline dir: tests/tiny_sd3.py's tiny CLIP encoders (no T5: zeros of width
4096, as the SD3 pipeline pads) with a bigger SD3 transformer and a VAE of GC_VAE_LEVELS levels."""
import os, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
import tiny_sd3

t0 = time.time()
w, n_prompts = Path(sys.argv[1]), int(sys.argv[2])
size, layers, heads, levels = (int(os.environ[k]) for k in ("GC_SAMPLE", "GC_LAYERS", "GC_HEADS", "GC_VAE_LEVELS"))
parts = tiny_sd3.tiny_sd3_components(seed=0)
torch.manual_seed(0)
parts["transformer"] = SD3Transformer2DModel(
    sample_size=size, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
    num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=64 * heads,
    pooled_projection_dim=2 * tiny_sd3.CLIP_PROJECTION, pos_embed_max_size=size).bfloat16().eval()
parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(16,) * levels,
                             layers_per_block=1, latent_channels=16, norm_num_groups=4,
                             sample_size=size * 2 ** (levels - 1), scaling_factor=1.5305, shift_factor=0.0609,
                             use_quant_conv=False, use_post_quant_conv=False).eval()
StableDiffusion3Pipeline(**parts).save_pretrained(w / "sd3")
params = sum(p.numel() for p in parts["transformer"].parameters())
subjects = ["a red cube", "a photo of a cat", "a city at night", "a bowl of fruit", "a mountain lake",
            "an old car", "a portrait of a woman", "a forest path"]
(w / "prompts.txt").write_text("".join(f"{subjects[i % 8]}, style {i}\n" for i in range(n_prompts)))
print(f"sd3 dir: transformer {params / 1e6:.0f}M params ({layers} blocks, {64 * heads} wide, 16x{size}x{size} "
      f"latents, {(size // 2) ** 2} image tokens), VAE x{2 ** (levels - 1)} -> {size * 2 ** (levels - 1)} px; "
      f"{n_prompts} prompts; built in {time.time() - t0:.1f}s")
EOF
note "c build sd3 dir" "$RC" "$DT" "$(grep -o 'transformer [0-9]*M params[^;]*' "$W/last.log" | head -1)"

cat > "$W/run.yaml" <<EOF
root: $W/runs
device: $DEV
executor: local
teacher: {kind: sd3, path: $W/sd3, dtype: bfloat16, kwargs: {max_sequence_length: 77}}
schedule: {shift: 3.0, teacher_steps: $M, windows: 4}
generate: {prompts: $W/prompts.txt, samples_per_prompt: $PER_PROMPT, shard_size: $SHARD, batch_size: $GBATCH,
           store_dtype: float16}
train:
  methods: [$GC_METHODS]
  prefetch: $GC_PREFETCH
  loader_workers: $GC_LOADER_WORKERS
  compile: $GC_COMPILE
  steps: $STEPS
  batch_size: $TBATCH
  mixed_precision: bf16
  checkpoint_every: $CKPT
  log_every: $LOGE
  method_options: {perflow: {x0: teacher_samples}}
evaluate: {nfes: [1, 4], teacher_nfe: $M, n_samples: $NSAMP, batch_size: $EBATCH, features: pixels}
EOF
cat "$W/run.yaml" >> "$C"
for stage in teacher generate train evaluate report; do
  smi_start "c_$stage"
  run "$C" "$(cleft)" "$PY" -m pipeline.cli "$stage" -c "$W/run.yaml"
  note "c $stage" "$RC" "$DT" "$(grep "^$stage: finished\|^error\|Error" "$W/last.log" | tail -1 | cut -c1-90) $(smi_stop "c_$stage")"
done
# per method: s/step, data wait and teacher-for-data seconds from losses.jsonl (one file back: c_losses.jsonl)
timeout 20 "$PY" - "$W/runs" "$OUT" <<'EOF' 2>&1 | tee -a "$C" "$SUMMARY"
import json, statistics, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = []
for log in sorted(runs.glob("train/*/losses.jsonl")):
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    lines += [json.dumps({"run": log.parent.name, **r}) for r in rows]
    if rows:
        step_s = [r["step_s"] for r in rows[1:]] or [rows[0]["step_s"]]     # the first logged step warms up
        print(f"  train {log.parent.name.rsplit('-', 1)[0]:14s} step {statistics.median(step_s):.3f} s (median of "
              f"{len(step_s)} logged steps, first {rows[0]['step_s']:.3f} s), data wait "
              f"{statistics.mean(r['data_wait_s'] for r in rows):.3f} s, teacher-for-data "
              f"{statistics.mean(r['teacher_data_s'] for r in rows):.3f} s, last loss {rows[-1].get('loss', float('nan')):.4g}")
(out / "c_losses.jsonl").write_text("".join(l + "\n" for l in lines))
for p in sorted(runs.glob("evaluate/*/scores.parquet"))[:1]:
    import pandas as pd
    df = pd.read_parquet(p)
    df.to_csv(out / "c_scores.csv", index=False)
    print(f"  evaluate: {len(df)} score rows ({', '.join(sorted(df['metric'].unique())) if 'metric' in df else ''})")
EOF
REPORT=$(find "$W/runs" -name report.md 2>/dev/null | head -1)
[ -n "$REPORT" ] && cp "$REPORT" "$OUT/c_report.md"

# ------------------------------------------------------------------ d: generate-stage overhead on the device
D=$OUT/d.log
if [[ "$PARTS" != *d* ]]; then
  note "d" "-" "0" "not asked (GPU_CHECK_PARTS=$PARTS)"
elif [ "$(left)" -ge 45 ]; then
  smi_start d
  run "$D" "$(limit 60 8)" "$PY" bench/generate_throughput.py --device "$DEV" --demo-root "$W/no-demo" \
    $( [ "$SMALL" = 1 ] && echo --samples 32 --steps 8 --batch 16 )
  note "d generate_throughput" "$RC" "$DT" "$(grep -o 'pipeline / bare throughput = [0-9.]*' "$W/last.log" | tail -1) $(smi_stop d)"
  if [ "$DEV" != cpu ] && [ "$(left)" -ge 60 ]; then
    for flag in "" --compile; do
      run "$D" "$(limit 90 5)" "$PY" bench/generate_scale.py --device "$DEV" --batch 16 --steps 8 $flag
      note "d generate MFU $flag" "$RC" "$DT" "$(grep -o 'samples/s, MFU [0-9.]*%' "$W/last.log" | tail -1)"
    done
  fi
else
  note "d generate_throughput" "-" "0" "skipped: $(left)s left"
fi

echo "total $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
echo "==== summary ($OUT/summary.txt)"
cat "$SUMMARY"
