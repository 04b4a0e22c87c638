"""``sr convert`` and ``sr interpolate``: model files in, model files out. Heavy imports
(torch) stay inside the handlers so ``sr --help`` is instant."""

from __future__ import annotations

import argparse


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a generator file (ours, BasicSR/Real-ESRGAN, old ESRGAN, any spandrel architecture) to "
             "ours (.safetensors), BasicSR/Real-ESRGAN .pth, or ONNX (.onnx)",
        description=(
            "Convert a generator file. Any supported input (our .safetensors, a bare safetensors "
            "state dict, BasicSR/Real-ESRGAN .pth with RRDBNet or the compact SRVGGNetCompact, the "
            "ESRGAN repository's .pth, the oldest ESRGAN model.N .pth, or any architecture spandrel "
            "detects: SwinIR, HAT, DAT, OmniSR, SPAN, Real-CUGAN, ...) is written by OUT's extension: "
            ".safetensors: our self-describing file; .pth or .pt: the .pth that Real-ESRGAN, BasicSR "
            "and chaiNNer load (params_ema for RRDBNet, params for the others); .onnx: an ONNX graph "
            "with dynamic batch/height/width, verified with ONNX Runtime against PyTorch on sample "
            "photographs before it is written. Any other extension is refused."
        ),
    )
    p.add_argument("input", metavar="IN", help="input model file (path or fsspec URL)")
    p.add_argument("output", metavar="OUT", help="output file: .safetensors, .pth, .pt or .onnx (path or fsspec URL)")
    p.add_argument("--to", choices=["sr", "basicsr", "onnx"], default=None,
                   help="output format; must agree with OUT's extension (default: from the extension)")
    p.add_argument("--onnx-precision", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations of an ONNX export (fp16 only for models that support it)")
    p.add_argument("--verify-on", action="append", default=None, metavar="IMAGE",
                   help="photograph to verify an ONNX export on (repeatable; default: the sample photographs "
                        "in assets/images)")
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
    p.add_argument("-o", "--output", required=True,
                   help="output file: .safetensors (ours), or .pth / .pt (BasicSR/Real-ESRGAN layout)")
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


# What each output extension is written as; anything else is refused before any work.
CONVERT_FORMATS = {".safetensors": "sr", ".pth": "basicsr", ".pt": "basicsr", ".onnx": "onnx"}
INTERPOLATE_FORMATS = {".safetensors": "sr", ".pth": "basicsr", ".pt": "basicsr"}


def output_format(url: str, formats: dict[str, str], requested: str | None = None) -> str:
    """The format OUT's extension names; refuses an extension the command cannot write,
    and a --to that says otherwise (a file's name must not lie about its bytes)."""
    import posixpath

    ext = posixpath.splitext(url.rstrip("/"))[1].lower()
    if ext not in formats:
        raise ValueError(f"{url}: cannot write a {ext or 'extension-less'} file; OUT must end in "
                         f"{', '.join(formats)} (the extension chooses the format)")
    if requested is not None and requested != formats[ext]:
        raise ValueError(f"--to {requested} and OUT {url} disagree (a {ext} file is written as {formats[ext]}); "
                         "change one of them")
    return formats[ext]


def _sample_photographs(paths: list[str] | None):
    """The photographs an ONNX export is verified on, decoded as uint8 arrays."""
    from pathlib import Path

    if not paths:
        folder = Path(__file__).resolve().parents[1] / "assets" / "images"
        paths = sorted(str(p) for p in folder.glob("*.png") if p.name != "camera.png")
        if not paths:
            raise ValueError("no sample photographs found to verify the ONNX export on; give --verify-on IMAGE")
    return [_decode_rgb(p) for p in paths]


def _decode_rgb(path: str):
    import io

    import numpy as np
    from PIL import Image

    from sr_core import storage

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image to verify the ONNX export on ({exc})") from None


def run_convert(args: argparse.Namespace) -> int:
    from sr_core import foreign, modelfile

    _refuse_existing(args.output, args.overwrite)
    target = output_format(args.output, CONVERT_FORMATS, args.to)
    photographs = _sample_photographs(args.verify_on) if target == "onnx" else None
    model = modelfile.load_generator(args.input)
    provenance = dict(modelfile.read_metadata(args.input).get("provenance") or {})
    is_foreign = isinstance(model, foreign.ForeignGenerator)
    if target == "onnx":
        from sr_core import onnx_export

        rows = onnx_export.export_onnx(model, args.output, photographs, args.onnx_precision)
        checks = ", ".join(f"{r['width']}x{r['height']} {r['psnr_db']:.1f} dB" for r in rows)
        print(f"wrote {args.output}: {model.arch_name} x{model.scale} ONNX opset {onnx_export.OPSET} "
              f"{args.onnx_precision}, dynamic batch/height/width; ONNX Runtime vs PyTorch PSNR: {checks}")
        return 0
    if target == "basicsr":
        # The export carries the model's own provenance (a .pth converted back names it).
        (foreign.save_foreign_pth if is_foreign else modelfile.save_basicsr_pth)(model, args.output, **provenance)
    else:
        provenance.setdefault("converted_from", args.input)
        (foreign.save_foreign if is_foreign else modelfile.save_generator)(model, args.output, **provenance)
    needs = f" (loading it needs spandrel {foreign.spandrel_version()})" if is_foreign else ""
    print(f"wrote {args.output}: {model.arch_name} x{model.scale} {model.hparams} ({target} format){needs}")
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    from sr_core import foreign, modelfile

    _refuse_existing(args.output, args.overwrite)
    target = output_format(args.output, INTERPOLATE_FORMATS)
    model_a = modelfile.load_generator(args.model_a)
    model_b = modelfile.load_generator(args.model_b)
    mixed = modelfile.interpolate_generators(model_a, model_b, args.alpha)
    if isinstance(mixed, foreign.ForeignGenerator):
        save = foreign.save_foreign_pth if target == "basicsr" else foreign.save_foreign
    else:
        save = modelfile.save_basicsr_pth if target == "basicsr" else modelfile.save_generator
    save(mixed, args.output, interpolated_from=[args.model_a, args.model_b], alpha=args.alpha)
    print(f"wrote {args.output}: (1 - {args.alpha}) * {args.model_a} + {args.alpha} * {args.model_b}")
    return 0
