#!/usr/bin/env bash
# The main job on the embedded default: local files, CPU, a small model.
# Every step is a real `sr` command you can copy. Outputs go to ${OUT:-demo-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
IMAGES=assets/images
mkdir -p "$OUT/models"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. Build two small RRDBNet x4 generators and save them as self-describing .safetensors"
run python - "$OUT/models" <<'PY'
import sys, torch
from sr_core import build_generator, save_generator
out = sys.argv[1]
for seed in (1, 2):
    torch.manual_seed(seed)
    model = build_generator("rrdbnet", "small", scale=4)
    save_generator(model, f"{out}/rrdb-small-x4-seed{seed}.safetensors", note="randomly initialised demo model")
n = sum(p.numel() for p in model.parameters())
print(f"rrdbnet 'small' preset: {model.hparams}, {n:,} parameters")
PY

step "2. Convert to BasicSR/Real-ESRGAN .pth (params_ema) and back"
run sr convert "$OUT/models/rrdb-small-x4-seed1.safetensors" "$OUT/models/rrdb-small-x4-seed1.pth" --overwrite
run sr convert "$OUT/models/rrdb-small-x4-seed1.pth" "$OUT/models/roundtrip.safetensors" --overwrite

step "3. Network interpolation: 0.2 * seed1 + 0.8 * seed2"
run sr interpolate "$OUT/models/rrdb-small-x4-seed1.safetensors" "$OUT/models/rrdb-small-x4-seed2.safetensors" \
    --alpha 0.8 -o "$OUT/models/interp.safetensors" --overwrite

step "4. Score plain bicubic x4 on the sample photographs (PSNR/SSIM on Y, border cropped, as papers report)"
run sr eval "$IMAGES" --bicubic 4 --json "$OUT/eval-bicubic-x4.json"

step "5. Upscale the photographs x4 with the interpolated model (tiled, progress bar, failures reported)"
echo "(The model is untrained here, so the pictures show the pipeline, not quality.)"
run sr upscale "$IMAGES" -o "$OUT/upscaled" --model "$OUT/models/interp.safetensors" --overwrite

step "6. Score the same model the way step 4 scored bicubic"
run sr eval "$IMAGES" --model "$OUT/models/interp.safetensors" --json "$OUT/eval-interp-x4.json"

step "7. Cut the photographs into training sub-image shards (resumable; works gs:// to gs:// too)"
run sr prepare "$IMAGES" "$OUT/shards" --size 128 --step 64 --quiet

step "8. Read random training crops from the shards, as each rank of the training job does"
run python - "$OUT/shards" <<'PY'
import sys, time
from jobs.config import DataConfig
from jobs.data import build_train_loader
cfg = DataConfig(train_shards=sys.argv[1], gt_size=64, scale=4, batch_size=8, num_workers=2)
with build_train_loader(cfg, rank=0, world_size=1) as loader:
    batches = iter(loader)
    batch = next(batches)  # workers started
    start = time.perf_counter()
    for _ in range(20):
        batch = next(batches)
    rate = 20 * cfg.batch_size / (time.perf_counter() - start)
print(f"batch: lr {tuple(batch['lr'].shape)}, gt {tuple(batch['gt'].shape)}; {rate:.0f} crops/s with 2 workers")
PY

printf '\nDone. Outputs are in %s/\n' "$OUT"
