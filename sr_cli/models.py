"""``sr convert`` and ``sr interpolate``: model files in, model files out. Heavy imports
(torch) stay inside the handlers so ``sr --help`` is instant."""

from __future__ import annotations

import argparse


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a generator file (ours, BasicSR/Real-ESRGAN or old ESRGAN .pth) to ours, or ours to "
             "BasicSR/Real-ESRGAN .pth",
        description=(
            "Convert a generator file. Any supported input (our .safetensors, a bare safetensors "
            "state dict, BasicSR/Real-ESRGAN .pth with RRDBNet or the compact SRVGGNetCompact, the "
            "ESRGAN repository's .pth, the oldest ESRGAN model.N .pth) is written as our "
            "self-describing .safetensors, or — when OUT ends in .pth or --to basicsr is given — as "
            "the .pth that Real-ESRGAN, BasicSR and chaiNNer load (params_ema for RRDBNet, params "
            "for the compact generator)."
        ),
    )
    p.add_argument("input", metavar="IN", help="input model file (path or fsspec URL)")
    p.add_argument("output", metavar="OUT", help="output file (path or fsspec URL)")
    p.add_argument("--to", choices=["sr", "basicsr"], default=None,
                   help="output format (default: basicsr if OUT ends in .pth, else sr)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_convert)


def add_interpolate_parser(sub: argparse._SubParsersAction) -> None:
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
    provenance = dict(modelfile.read_metadata(args.input).get("provenance") or {})
    if target == "basicsr":
        # The export carries the model's own provenance (a .pth converted back names it).
        modelfile.save_basicsr_pth(model, args.output, **provenance)
    else:
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

