#!/usr/bin/env bash
# The main job on the embedded default: local files, local Ray, CPU, a small model
# (Real-ESRGAN's compact generator, the demo_x2 training preset).
# Every step is a real `sr` command you can copy. Outputs go to ${OUT:-demo-out}/.
#
#   TRAIN_STEPS  PSNR-stage steps (default: the demo_x2 preset's, about 3 minutes on 2 CPU cores)
#   GAN_STEPS    GAN-stage steps from the PSNR weights (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
TRAIN_STEPS=${TRAIN_STEPS:-}
GAN_STEPS=${GAN_STEPS:-200}
IMAGES=assets/images
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# Three photographs train, the fourth validates: the model is scored on an image it
# never saw.
rm -rf "$OUT/val"
mkdir -p "$OUT/val"
cp "$IMAGES/coffee.png" "$OUT/val/"

step "1. Cut the training photographs into sub-image shards (raw RGB: no decoding per crop; resumable; gs:// too)"
run sr prepare "$IMAGES" "$OUT/shards" --size 128 --step 64 --format raw --exclude coffee.png --quiet

step "2. Train the compact x2 generator, PSNR stage (L1), validating on the held-out photograph"
echo "(Real-ESRGAN's compact generator starts from nearest-neighbour upscaling and learns the"
echo " difference, so within minutes of CPU its validation PSNR, printed beside plain bicubic's"
echo " on the same image, passes bicubic.)"
rm -rf "$OUT/train" "$OUT/train-gan"
run sr train --preset demo_x2 data.train_shards="$OUT/shards" data.val_folder="$OUT/val" \
    train.run_dir="$OUT/train" ${TRAIN_STEPS:+train.max_steps="$TRAIN_STEPS"}

step "3. GAN stage from the PSNR weights (pixel + perceptual + relativistic GAN losses, VGG-style D)"
echo "(The demo's perceptual loss uses a randomly initialised VGG19: the published presets refuse"
echo " to start without the ImageNet weights, given as loss.vgg_weights=PATH_OR_URL. A few hundred"
echo " GAN steps trade some PSNR for sharpness; the comparison below shows both models.)"
run sr train --preset demo_x2 train.stage=gan train.pretrained="$OUT/train/model.safetensors" \
    data.train_shards="$OUT/shards" data.val_folder="$OUT/val" train.run_dir="$OUT/train-gan" \
    train.max_steps="$GAN_STEPS" train.val_every=100 train.checkpoint_every=100 train.log_every=25

step "4. Network interpolation of the two stages (ESRGAN's 0.8 GAN / 0.2 PSNR), and an export for Real-ESRGAN tools"
run sr interpolate "$OUT/train/model_ema.safetensors" "$OUT/train-gan/model_ema.safetensors" \
    --alpha 0.8 -o "$OUT/interp-0.8.safetensors" --overwrite
run sr convert "$OUT/train/model_ema.safetensors" "$OUT/train/model_ema.pth" --overwrite

step "5. Compare the trained models with interpolation baselines on the held-out photograph"
run sr eval "$OUT/val" --model "$OUT/train/model_ema.safetensors" --model "$OUT/train-gan/model_ema.safetensors" \
    --baseline all --figures 1 --out "$OUT/eval"
python - "$OUT/eval/results.json" "$OUT/train/model_ema.safetensors" "$OUT/train-gan/model_ema.safetensors" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))["sets"][0]["summary"]
bicubic = summary["bicubic"]["psnr"]
print()
for label, name in (("PSNR stage", sys.argv[2]), ("GAN stage", sys.argv[3])):
    psnr = summary[name]["psnr"]
    print(f"{label} model (EMA): {psnr:.2f} dB PSNR-Y on the held-out photograph, "
          f"{psnr - bicubic:+.2f} dB {'above' if psnr > bicubic else 'below'} bicubic ({bicubic:.2f} dB)")
PY

step "6. Upscale the photographs with the trained model (tiled, progress bar, failures reported)"
run sr upscale "$IMAGES" -o "$OUT/upscaled" --model "$OUT/train/model_ema.safetensors" --overwrite

step "7. Batch-upscale the same folder on Ray Data (a local Ray; the same pipeline runs on a GPU cluster)"
echo "(Its summary, per-image metrics and failure list land in $OUT/batch/_sr_batch/demo/.)"
run sr batch "$IMAGES" "$OUT/batch" --model "$OUT/train/model_ema.safetensors" --overwrite --run-id demo

printf '\nDone. Outputs are in %s/ (training runs: tensorboard --logdir %s)\n' "$OUT" "$OUT"
