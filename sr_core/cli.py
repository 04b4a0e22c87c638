"""sr_core's subcommands: convert, interpolate, upscale, eval. Heavy imports stay inside the
handlers so ``sr --help`` is instant."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a generator file (ours, BasicSR/Real-ESRGAN or old ESRGAN .pth) to ours, or ours to BasicSR .pth",
        description=(
            "Convert a generator file. Any supported input (our .safetensors, a bare safetensors "
            "state dict, BasicSR/Real-ESRGAN .pth, the ESRGAN repository's .pth, the oldest ESRGAN "
            "model.N .pth) is written as our self-describing .safetensors, or — when OUT ends in "
            ".pth or --to basicsr is given — as a BasicSR .pth with params_ema that Real-ESRGAN "
            "and chaiNNer load."
        ),
    )
    p.add_argument("input", metavar="IN", help="input model file (path or fsspec URL)")
    p.add_argument("output", metavar="OUT", help="output file (path or fsspec URL)")
    p.add_argument("--to", choices=["sr", "basicsr"], default=None,
                   help="output format (default: basicsr if OUT ends in .pth, else sr)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_convert)

    p = sub.add_parser(
        "interpolate",
        help="network interpolation of two generators: (1 - alpha) * A + alpha * B",
        description=(
            "Blend the weights of two generators of the same architecture (ESRGAN network "
            "interpolation). With A a PSNR-oriented model and B its GAN fine-tune, alpha trades "
            "fidelity (0) for perceptual sharpness (1); the ESRGAN paper uses 0.8."
        ),
    )
    p.add_argument("model_a", metavar="A", help="first generator (weight 1 - alpha)")
    p.add_argument("model_b", metavar="B", help="second generator (weight alpha)")
    p.add_argument("--alpha", type=float, default=0.8, help="weight of B, in [0, 1] (default: 0.8)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=run_interpolate)

    from sr_core.upscale_cli import add_upscale_parser

    add_upscale_parser(sub)
    add_eval_parser(sub)


def _refuse_existing(url: str, overwrite: bool) -> None:
    """Checked before any model is loaded, so a bad OUT costs nothing."""
    from sr_core import storage

    fs, path = storage.get_fs(url)
    if fs.isdir(path):
        raise ValueError(f"{url} is a folder; OUT must be a file name (e.g. {storage.join(url, 'model.safetensors')})")
    if not overwrite and fs.exists(path):
        raise FileExistsError(f"{url}: the file exists; pass --overwrite to replace it")


def run_convert(args: argparse.Namespace) -> int:
    from sr_core import modelfile

    target = args.to or ("basicsr" if args.output.lower().endswith(".pth") else "sr")
    _refuse_existing(args.output, args.overwrite)
    model = modelfile.load_generator(args.input)
    if target == "basicsr":
        modelfile.save_basicsr_pth(model, args.output)
    else:
        meta = modelfile.read_metadata(args.input)
        provenance = dict(meta.get("provenance") or {})
        provenance.setdefault("converted_from", args.input)
        modelfile.save_generator(model, args.output, **provenance)
    print(f"wrote {args.output}: {model.arch_name} x{model.scale} {model.hparams} ({target} format)")
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    from sr_core import modelfile

    _refuse_existing(args.output, args.overwrite)
    model_a = modelfile.load_generator(args.model_a)
    model_b = modelfile.load_generator(args.model_b)
    mixed = modelfile.interpolate_generators(model_a, model_b, args.alpha)
    modelfile.save_generator(mixed, args.output, interpolated_from=[args.model_a, args.model_b], alpha=args.alpha)
    print(f"wrote {args.output}: (1 - {args.alpha}) * {args.model_a} + {args.alpha} * {args.model_b}")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model (or bicubic) on HR images: PSNR/SSIM as SR papers report them",
        description=(
            "For each HR image: crop to a multiple of the scale, make the LR input with "
            "MATLAB-bicubic downscaling, upscale it with the model (or bicubic), and report "
            "PSNR/SSIM on the Y channel (BT.601) with the border of `scale` pixels cropped — "
            "the conventions of published tables (bicubic x4 on Set5: 28.42 dB)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="HR", help="HR images or folders (paths or fsspec URLs)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="generator file to score")
    source.add_argument("--bicubic", type=int, metavar="SCALE", help="score plain bicubic upscaling at this scale")
    p.add_argument("--rgb", action="store_true", help="score on RGB instead of the Y channel")
    p.add_argument("--crop-border", type=int, default=None, help="pixels cropped at each edge (default: the scale)")
    p.add_argument("--tile", type=int, default=None, help="tile size for the model (0: untiled; default: automatic)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    p.add_argument("--json", dest="json_out", help="also write the per-image scores and means as JSON here")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import json
    import sys

    from sr_core import codecs, evaluate, storage

    if args.model:
        from sr_core.upscaler import Upscaler

        upscaler = Upscaler.from_file(args.model, device=args.device, tile=args.tile)
        scale, upscale, what = upscaler.scale, upscaler, args.model
    else:
        if args.bicubic < 1:
            raise ValueError(f"--bicubic takes a scale of 1 or more, got {args.bicubic}")
        scale, upscale, what = args.bicubic, evaluate.bicubic_upscaler(args.bicubic), f"bicubic x{args.bicubic}"
    urls, labels = [], {}
    for item in args.inputs:
        for url in storage.list_files(item, suffixes=codecs.INPUT_EXTENSIONS):
            urls.append(url)
            labels[url] = storage.relative_key(item, url)
    if not urls:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    scores, failures = [], []
    channel = "RGB" if args.rgb else "Y"
    print(f"{what}: PSNR/SSIM on {channel}, crop_border={args.crop_border if args.crop_border is not None else scale}")
    print(f"{'image':<40} {'size':>11} {'PSNR':>8} {'SSIM':>7}")
    for url in urls:
        try:
            s = evaluate.score_image(url, codecs.read_image(url), scale, upscale, args.crop_border, not args.rgb)
        except ValueError as exc:  # one bad image is reported, the rest are scored
            failures.append((url, str(exc)))
            print(f"{url:<40} FAILED: {exc}", file=sys.stderr)
            continue
        scores.append(s)
        print(f"{labels[url][-40:]:<40} {s.width:>5}x{s.height:<5} {s.psnr:8.3f} {s.ssim:7.4f}")
    if scores:
        mean_psnr = sum(s.psnr for s in scores) / len(scores)
        mean_ssim = sum(s.ssim for s in scores) / len(scores)
        print(f"{'mean of ' + str(len(scores)):<40} {'':>11} {mean_psnr:8.3f} {mean_ssim:7.4f}")
    if args.json_out:
        report = {"what": what, "scale": scale, "channel": channel,
                  "images": [vars(s) for s in scores], "failures": [{"input": u, "reason": r} for u, r in failures]}
        if scores:
            report.update(mean_psnr=mean_psnr, mean_ssim=mean_ssim)
        storage.write_bytes(args.json_out, json.dumps(report, indent=2).encode())
    return 1 if failures else 0
