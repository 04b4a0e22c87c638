"""Model files: self-describing ``.safetensors`` of our own, and imports of foreign
ESRGAN / Real-ESRGAN ``.pth`` files.

Our files carry metadata naming the architecture, its hyperparameters and scale, so
``load_generator(url)`` needs nothing else. Foreign files are read with
``torch.load(weights_only=True)`` — never plain pickle, which would run code from the
file — and their layout is recognized from the keys:

- BasicSR / Real-ESRGAN: ``conv_first``, ``body.N.rdbK.convM``, ... (ours), possibly
  wrapped in ``params_ema`` / ``params`` and prefixed ``module.``;
- the ESRGAN repository's: ``RRDB_trunk.N.RDBK.convM``, ``trunk_conv``, ``upconv1``,
  ``HRconv``;
- the oldest ESRGAN one: ``model.0``, ``model.1.sub.N.RDBK.convM.0``, ``model.3``, ...;
- Real-ESRGAN's compact generator (SRVGGNetCompact: ``realesr-animevideov3``,
  ``realesr-general-x4v3``): ``body.0``, ``body.1``, ... alternating conv and PReLU.

For foreign files the hyperparameters come from tensor shapes (RRDBNet: num_feat /
num_block / num_grow_ch / scale; compact: num_feat / num_conv / scale / activation).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import re
import struct
import threading

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from sr_core import foreign, storage
from sr_core.errors import MAX_SHOWN, shown
from sr_core.archs import GENERATORS, build_generator, check_hparams
from sr_core.archs.srvgg import SCALES as COMPACT_SCALES
from sr_core.modelformat import FORMAT, FORMAT_VERSION, PTH_METADATA_KEY, ModelFileError  # noqa: F401 (public here)

# Key layouts of the two old ESRGAN formats, mapped onto ours (= BasicSR's).
_ESRGAN_RENAMES = [
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
    (re.compile(r"^trunk_conv\."), "conv_body."),
    (re.compile(r"^upconv(\d)\."), r"conv_up\1."),
    (re.compile(r"^HRconv\."), "conv_hr."),
]


MAX_METADATA_DEPTH = 32
"""Deepest nesting of lists and objects accepted in a JSON metadata field (``hparams``,
``provenance``). Ours nest a few levels (a training config inside the provenance); a
file nested hundreds of thousands deep is built to exhaust the parser's stack."""

JSON_FIELDS = ("hparams", "provenance")
"""Metadata fields that hold JSON."""

def _json_depth(value) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _decode_json_field(url: str, name: str, text: str):
    """Metadata field ``name`` decoded (ValueError when it is not JSON), refused when it
    nests deeper than ``MAX_METADATA_DEPTH`` (the decoder's own recursion included)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        depth = MAX_METADATA_DEPTH + 1
    else:
        depth = _json_depth(value)
    if depth > MAX_METADATA_DEPTH:
        raise ModelFileError(f"{url}: metadata {name} is nested more than {MAX_METADATA_DEPTH} levels deep; "
                             "the file is damaged or was made to exhaust the loader (sr-cloud writes a few levels)")
    return value


def _check_json_fields(url: str, meta: dict[str, str]) -> None:
    for name in JSON_FIELDS:
        if name in meta:
            try:
                _decode_json_field(url, name, meta[name])
            except ModelFileError:
                raise
            except ValueError:
                pass  # not JSON at all: load_generator and read_metadata say what they make of it


class UnrecognizedLayoutError(ModelFileError):
    """None of our own layouts: the file goes to spandrel (``sr_core.foreign``)."""


# ---------------------------------------------------------------- saving


def generator_metadata(model: nn.Module, /, **provenance) -> dict[str, str]:
    if getattr(model, "arch_name", None) not in GENERATORS or not hasattr(model, "hparams"):
        raise ValueError(f"{type(model).__name__} is not a registered generator; "
                         f"model files hold one of: {', '.join(sorted(GENERATORS))}")
    check_hparams(model.arch_name, **model.hparams)  # never write a file no loader would accept
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch_name,
        "hparams": json.dumps(model.hparams, sort_keys=True),
        "scale": str(model.scale),
    }
    if provenance:
        meta["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
    return meta


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone to be safe and contiguous.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_generator(model: nn.Module, url: str, /, **provenance) -> None:
    """Write ``model`` to ``url`` as self-describing ``.safetensors`` (atomically).

    Keyword arguments are recorded as provenance (e.g. ``run="exp1", step=40000``; any
    name, ``url`` and ``model`` included, since the first two are positional-only).
    """
    data = safetensors_save(_plain_state_dict(model), metadata=generator_metadata(model, **provenance))
    storage.write_bytes(url, data)


# Beside the tensors, our .pth exports carry our metadata under PTH_METADATA_KEY (plain
# strings, which weights_only loading reads and which BasicSR, Real-ESRGAN and chaiNNer
# ignore: they read only their wrapper key). It makes the export self-describing, which
# matters where the tensors cannot tell (a compact model's ReLU from its LeakyReLU).

# The wrapper key each architecture's own project uses: BasicSR / Real-ESRGAN read
# ``params_ema`` (else ``params``); Real-ESRGAN's compact files hold ``params``, the only
# key its network interpolation (``--denoise_strength``) reads.
PTH_WRAPPER = {"rrdbnet": "params_ema", "srvgg_compact": "params"}


def save_basicsr_pth(model: nn.Module, url: str, /, **provenance) -> None:
    """Write ``model`` as a BasicSR / Real-ESRGAN ``.pth`` that their tools and chaiNNer
    load: ``{"params_ema": state}`` for RRDBNet, ``{"params": state}`` for the compact
    generator (Real-ESRGAN's own layouts), plus our metadata under ``PTH_METADATA_KEY``.
    Only these two architectures exist in their code."""
    arch = getattr(model, "arch_name", None)
    if arch not in PTH_WRAPPER:
        raise ValueError(f"BasicSR/Real-ESRGAN .pth export supports {' and '.join(PTH_WRAPPER)} only, not {arch}")
    if model.hparams.get("upsampler", "nearest") != "nearest":
        raise ValueError("BasicSR's RRDBNet has nearest upsampling only; this model uses pixelshuffle")
    buf = io.BytesIO()
    torch.save({PTH_WRAPPER[arch]: _plain_state_dict(model),
                PTH_METADATA_KEY: generator_metadata(model, **provenance)}, buf)
    storage.write_bytes(url, buf.getvalue())


# ---------------------------------------------------------------- loading


def read_model_file(url: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata (empty for foreign files) from any supported file."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: model file not found") from None
    if not data:
        raise ModelFileError(f"{url}: empty file, not a model")
    if _looks_like_safetensors(data):
        state, meta = _read_safetensors(url, data)
    elif data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        state, meta = _read_torch_file(url, data)
    else:
        raise ModelFileError(f"{url}: not a model file (neither .safetensors nor a PyTorch .pth)")
    # Every reader of the metadata (the loader, read_metadata, sr convert's provenance) decodes it.
    _check_json_fields(url, meta)
    return state, meta


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(data) >= 10 and data[8:9] == b"{"


def _read_safetensors(url: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ModelFileError(f"{url}: truncated .safetensors file (header says {header_len} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error type for corrupt data
        raise ModelFileError(f"{url}: corrupt or truncated .safetensors file ({exc})") from None
    return tensors, dict(header.get("__metadata__") or {})


def _read_torch_file(url: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only=True refuses anything that would execute code on unpickling. Its
        # message suggests weights_only=False, which would run the file's code: never
        # pass that on; name what the file wanted and the safe way to convert it.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it needs the Python object {wanted[1]}" if wanted else "it is corrupt or holds more than tensors"
        raise ModelFileError(
            f"{url}: refused as a PyTorch weights file ({what}); only plain tensors are read, unpickling "
            "code is never run. To convert it safely, load it where its code is trusted and save just the "
            "tensors (torch.save(model.state_dict(), 'weights.pth') or safetensors' save_file), then "
            "`sr convert weights.pth model.safetensors`"
        ) from None
    meta = obj.get(PTH_METADATA_KEY) if isinstance(obj, dict) else None
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        meta = {}  # another tool's file, or an entry of the wrong shape: read as a foreign file
    return _unwrap_state_dict(url, obj), meta


def _unwrap_state_dict(url: str, obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        # BasicSR saves {"params": ..., "params_ema": ...}; the EMA weights are the good ones.
        for wrapper in ("params_ema", "params", "state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"{url}: no state dict found in the file")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        state[key[len("module."):] if key.startswith("module.") else key] = value
    if not state:
        raise ModelFileError(f"{url}: the file holds no tensors")
    return state


def load_generator(url: str, device: str | torch.device = "cpu") -> nn.Module:
    """Load any supported generator file: ours (self-describing), a bare safetensors
    state dict, a foreign ESRGAN / Real-ESRGAN .pth, or any other architecture that
    spandrel recognizes (``sr_core.foreign``; our own loaders are tried first). Returns
    the model in eval mode."""
    state, meta = read_model_file(url)
    if meta.get("format") == FORMAT and meta.get("arch", "").startswith(foreign.ARCH_PREFIX):
        return _load_foreign_checked(url, state, meta["arch"]).to(device).eval()
    if meta.get("format") == FORMAT:
        try:
            arch, hparams = meta["arch"], json.loads(meta["hparams"])
            if not isinstance(hparams, dict):
                raise ValueError("hparams is not a JSON object")
            _check_shapes(url, arch, hparams, state)
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelFileError):
                raise
            raise ModelFileError(f"{url}: bad sr-cloud metadata ({str(exc)[:MAX_SHOWN]})") from None
    else:
        try:
            arch, hparams, state = infer_architecture(url, state)
        except UnrecognizedLayoutError:
            return _load_foreign_checked(url, state, None).to(device).eval()
        _check_shapes(url, arch, hparams, state)
    _check_finite(url, state)
    model = build_generator(arch, **hparams)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _load_foreign_checked(url: str, state: dict[str, torch.Tensor], expected_arch: str | None) -> nn.Module:
    _check_finite(url, state)
    return foreign.load_foreign(url, state, expected_arch)


def _check_finite(url: str, state: dict[str, torch.Tensor]) -> None:
    """NaN or infinite weights (a diverged run, a damaged file) would turn every output
    into noise or black: refuse the file, naming the first such tensor."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"{url}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
                             "the training run diverged or the file is damaged: use an earlier checkpoint")


def _check_hparam_values(url: str, arch: str, hparams: dict, state: dict[str, torch.Tensor]) -> None:
    """Refuse hyperparameters that no file of this size could hold, before building even
    a shape-only skeleton: the meta device holds no data, but a claimed ``num_block`` of
    10^8 still builds 10^8 modules (minutes and gigabytes). Every count a generator has
    (blocks, heads) gives it at least one tensor each, and every width (features,
    channels) is a dimension of some tensor, so no honest integer hyperparameter exceeds
    the larger of the file's tensor count and its largest dimension."""
    if arch not in GENERATORS:
        return  # build_generator names the known ones
    defaults = {name: p.default for name, p in inspect.signature(GENERATORS[arch].__init__).parameters.items()
                if name != "self"}
    bound = max([len(state)] + [d for t in state.values() for d in t.shape])
    for name, value in hparams.items():
        if name not in defaults:
            continue  # build_generator names unknown hyperparameters
        default = defaults[name]
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelFileError(f"{url}: metadata hyperparameter {name} must be an integer, "
                                     f"got {shown(value)}; the file is damaged or was not written by sr-cloud")
            if abs(value) > bound:
                raise ModelFileError(f"{url}: metadata claims {name}={shown(value)}, but the file holds "
                                     f"{len(state)} tensors (largest dimension {bound}); the metadata "
                                     "does not describe these weights")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ModelFileError(f"{url}: metadata hyperparameter {name} must be a string, got {shown(value)}")


class _TooManyTensors(Exception):
    """Building the skeleton registered more parameters than the file holds tensors."""


@contextlib.contextmanager
def _at_most_parameters(limit: int):
    """Within the block, the thread that entered it may register at most ``limit``
    parameters (other threads are not counted): one more stops the build with
    ``_TooManyTensors``."""
    thread, count = threading.get_ident(), 0

    def count_one(module, name, param):
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            if count > limit:
                raise _TooManyTensors()

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count_one)
    try:
        yield
    finally:
        handle.remove()


def _check_shapes(url: str, arch: str, hparams: dict, state: dict[str, torch.Tensor]) -> None:
    """Compare the file's tensors with the architecture before allocating anything:
    metadata claiming a huge model must not make us allocate it (the skeleton is built
    on the meta device, which holds shapes only, after the claimed values were checked
    against the file's size). A strict load needs every parameter of the model to be a
    tensor of the file, so the build stops once it has registered about twice as many
    parameters as the file holds tensors: how long it runs is bounded by what the file
    holds, whatever the metadata claims (a padding tensor can lift a dimension to 10^6;
    it adds one tensor)."""
    _check_hparam_values(url, arch, hparams, state)
    try:
        # Twice the file's count and a little: a subclass may register parameters and drop
        # them again (MultiHeadRRDBNet deletes RRDBNet's conv_last).
        with torch.device("meta"), _at_most_parameters(2 * len(state) + 16):
            skeleton = build_generator(arch, **hparams)
    except _TooManyTensors:
        raise ModelFileError(f"{url}: the metadata describes a {arch} with more weight tensors than the "
                             f"{len(state)} the file holds ({shown(hparams)}); the metadata does not describe "
                             "these weights") from None
    except ValueError:
        raise  # the registry's and the architectures' own messages
    except Exception as exc:  # negative widths and the like fail inside torch.nn
        raise ModelFileError(f"{url}: the metadata's hyperparameters {shown(hparams)} do not build a {arch} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    details = []
    if missing:
        details.append(f"missing {len(missing)} (e.g. {missing[0]})")
    if unexpected:
        details.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
    if wrong:
        details.append(f"{len(wrong)} of other shapes (e.g. {wrong[0]}: file {found[wrong[0]]}, "
                       f"model {expected[wrong[0]]})")
    raise ModelFileError(f"{url}: weights do not fit {arch} {shown(hparams)}: tensors {'; '.join(details)}")


def read_metadata(url: str) -> dict:
    """Metadata of one of our files, with ``hparams``/``provenance`` decoded ({} for foreign files).

    Provenance is informational: when it is not a JSON object (another tool's file, or
    an edited one), it is returned as ``{"original_provenance": <the text>}`` rather than
    refusing a model whose weights load fine."""
    _, meta = read_model_file(url)
    out = dict(meta)
    if "hparams" in out:
        try:
            out["hparams"] = json.loads(out["hparams"])
        except ValueError:
            raise ModelFileError(f"{url}: bad sr-cloud metadata (hparams is not JSON)") from None
    if "provenance" in out:
        try:
            provenance = json.loads(out["provenance"])
        except ValueError:
            provenance = None
        out["provenance"] = provenance if isinstance(provenance, dict) else {"original_provenance": out["provenance"]}
    return out


# ---------------------------------------------------------------- foreign layouts


def infer_architecture(url: str, state: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Recognize a foreign layout; return (arch name, hparams, state in our keys)."""
    if "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state):
        state = _rename_oldest_esrgan(url, state)
    elif any(k.startswith("RRDB_trunk.") for k in state):
        state = _rename_keys(state, _ESRGAN_RENAMES)
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        return "rrdbnet", _rrdbnet_hparams_from_shapes(url, state), state
    if "body.0.weight" in state and all(_COMPACT_KEY.match(k) for k in state):
        return "srvgg_compact", _srvgg_hparams_from_shapes(url, state), state
    sample = ", ".join(sorted(state)[:4])
    raise UnrecognizedLayoutError(f"{url}: unrecognized weight layout (keys begin {sample}, ...); supported: "
                         "ESRGAN/Real-ESRGAN RRDBNet in BasicSR, ESRGAN-repository or oldest model.N layout, "
                         "Real-ESRGAN's compact SRVGGNetCompact")


def _rename_keys(state: dict, renames: list) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _rename_oldest_esrgan(url: str, state: dict) -> dict:
    """Oldest ESRGAN: model.0 = conv_first, model.1.sub.N = RRDBs then the trunk conv,
    then per x2 stage (upsample, conv, act), then HR conv, act, last conv."""
    body = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
    trunk = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
    top = re.compile(r"^model\.(\d+)\.(weight|bias)$")
    out, top_level = {}, {}
    for key, value in state.items():
        if m := body.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := trunk.match(key):
            out[f"conv_body.{m[2]}"] = value
        elif m := top.match(key):
            top_level.setdefault(int(m[1]), {})[m[2]] = value
        else:
            raise ModelFileError(f"{url}: unexpected key {shown(key)} in an old-ESRGAN (model.N) file")
    indices = sorted(top_level)
    if len(indices) < 4 or indices[0] != 0:
        raise ModelFileError(f"{url}: incomplete old-ESRGAN (model.N) file")
    convs_after_trunk = indices[1:]
    up_indices, hr_index, last_index = convs_after_trunk[:-2], convs_after_trunk[-2], convs_after_trunk[-1]
    if len(up_indices) not in (2, 3):
        raise ModelFileError(f"{url}: old-ESRGAN file with {len(up_indices)} upsampling stages; "
                             "only x4 and x8 exist in that layout")
    names = {0: "conv_first", hr_index: "conv_hr", last_index: "conv_last"}
    names.update({idx: f"conv_up{n + 1}" for n, idx in enumerate(up_indices)})
    for idx, params in top_level.items():
        for kind, value in params.items():
            out[f"{names[idx]}.{kind}"] = value
    return out


def _rrdbnet_hparams_from_shapes(url: str, state: dict) -> dict:
    first = state["conv_first.weight"]
    num_feat, in_channels = first.shape[0], first.shape[1]
    num_out_ch = state["conv_last.weight"].shape[0]
    num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    num_grow_ch = state["body.0.rdb1.conv1.weight"].shape[0]
    # Input channels are num_in_ch x unshuffle^2; models map RGB->RGB or L->L, so take
    # num_in_ch = num_out_ch when that divides evenly.
    unshuffle_sq = in_channels // num_out_ch if in_channels % num_out_ch == 0 else 0
    scale_for_unshuffle_sq = {1: 4, 4: 2, 16: 1}
    if unshuffle_sq not in scale_for_unshuffle_sq:
        raise ModelFileError(f"{url}: conv_first has {in_channels} input channels for {num_out_ch} "
                             "output channels; cannot tell the scale")
    scale = scale_for_unshuffle_sq[unshuffle_sq]
    if "conv_up3.weight" in state:
        scale = 8
    upsampler = "pixelshuffle" if state["conv_up1.weight"].shape[0] == 4 * num_feat else "nearest"
    return dict(num_in_ch=in_channels // unshuffle_sq, num_out_ch=num_out_ch, scale=scale,
                num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch, upsampler=upsampler)


_COMPACT_KEY = re.compile(r"^body\.\d+\.(weight|bias)$")


def _srvgg_hparams_from_shapes(url: str, state: dict) -> dict:
    """Real-ESRGAN's compact layout: convolutions (4-D weights) at body.0, body.2, ...,
    activations between them. The first conv gives num_in_ch and num_feat, the last one
    ``num_out_ch * scale**2`` outputs, the count of convs num_conv + 2. Whether the
    layout is complete and consistent is checked afterwards, tensor by tensor, against
    the model these values describe."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items() if k.endswith(".weight") and v.ndim == 4)
    if len(convs) < 2 or convs[0] != 0:
        raise ModelFileError(f"{url}: a compact (SRVGGNetCompact) layout needs at least a first and a last "
                             f"convolution, starting at body.0; found convolutions at body indices {convs[:8]}")
    num_feat, num_in_ch = state["body.0.weight"].shape[:2]
    if num_in_ch < 1 or num_feat < 1:
        raise ModelFileError(f"{url}: body.0.weight has shape {tuple(state['body.0.weight'].shape)}; "
                             "not a compact generator's first convolution")
    last_out = state[f"body.{convs[-1]}.weight"].shape[0]
    # Input and output channels are equal (the upscaled input is added to the output).
    scale = round((last_out / num_in_ch) ** 0.5)
    if num_in_ch * scale * scale != last_out or scale not in COMPACT_SCALES:
        raise ModelFileError(f"{url}: the last convolution has {last_out} outputs for {num_in_ch} input channels; "
                             f"a compact generator has channels x scale^2 of them, scale one of {list(COMPACT_SCALES)}")
    # PReLU has one slope per channel; ReLU and LeakyReLU have no weights, and nothing in
    # the tensors tells them apart (Real-ESRGAN's published compact models all use PReLU).
    if "body.1.weight" not in state:
        raise ModelFileError(f"{url}: a compact generator whose activations hold no weights (ReLU or LeakyReLU), "
                             "and the tensors cannot tell which: build it with sr_core.build_generator("
                             "'srvgg_compact', activation='relu' or 'leakyrelu', ...), load these tensors into it "
                             "and write it with sr_core.save_generator, whose files record the activation")
    return dict(num_in_ch=num_in_ch, num_out_ch=num_in_ch, scale=scale, num_feat=num_feat,
                num_conv=len(convs) - 2, activation="prelu")


# ---------------------------------------------------------------- interpolation


def interpolate_generators(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """Network interpolation (ESRGAN paper, sec. 3.4): weights (1 - alpha) * A + alpha * B.

    With A the PSNR-oriented model and B the GAN one, alpha trades fidelity (0) for
    perceptual sharpness (1). Both must be the same architecture and hyperparameters.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if (model_a.arch_name, model_a.hparams) != (model_b.arch_name, model_b.hparams):
        raise ValueError(
            f"cannot interpolate different architectures: {model_a.arch_name} {model_a.hparams} "
            f"vs {model_b.arch_name} {model_b.hparams}"
        )
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    mixed = {}
    for key, a in state_a.items():
        b = state_b[key]
        # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights.
        mixed[key] = (1 - alpha) * a + alpha * b if a.is_floating_point() else a.clone()
    # A spandrel-built model is rebuilt as a copy of A (its class is spandrel's).
    out = (copy.deepcopy(model_a) if isinstance(model_a, foreign.ForeignGenerator)
           else build_generator(model_a.arch_name, **model_a.hparams))
    out.load_state_dict(mixed)
    return out.eval()
