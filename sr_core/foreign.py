"""Models of other projects' architectures (SwinIR, HAT, DAT, OmniSR, SPAN, Real-CUGAN, ...)
through spandrel (chaiNNer's model loader, MIT licence, PyPI ``spandrel``).

spandrel detects an architecture and its hyperparameters from a state dict's keys and
shapes, builds the model with its own copy of the architecture's code, and describes what
the model needs: scale, input/output channels, a size requirement (minimum side, a
multiple of the window size, square only), whether fp16/bf16 work and whether tiling is
safe. ``ForeignGenerator`` carries that description as plain attributes, which the
Upscaler reads; nothing here or there knows any one architecture.

Security: spandrel's own ``load_from_file`` reads ``.pth`` with a restricted unpickler
(tensors and ``OrderedDict`` only), but it tries ``torch.jit.load`` first for ``.pt``
files (a TorchScript archive is code). We never let it open a file: the state dict is
read by ``sr_core.modelfile`` (safetensors, or ``torch.load(weights_only=True)``) and
handed over with ``ModelLoader().load_from_state_dict``.

Only ``spandrel`` itself is used, never ``spandrel_extra_arches``: the architectures
there carry non-commercial licences.

spandrel declares torchvision as a dependency, but only two of its architectures use it
(LaMa, an inpainting model, and RestoreFormer, a face restoration model; both are refused
here anyway), and torchvision from PyPI does not import beside a CPU-only torch of
another build. When torchvision cannot be imported, placeholders stand in for it while
spandrel's registry is imported; calling one raises ImportError.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import torch
import torch.utils._python_dispatch
from torch import nn

# Our files name a foreign architecture as this prefix + spandrel's architecture id.
ARCH_PREFIX = "spandrel:"
# spandrel's purposes we run: an image in, an image (upscaled or restored) out.
RUNNABLE_PURPOSES = ("SR", "Restoration")
TILING_NAMES = {1: "supported", 2: "discouraged", 3: "internal"}

_spandrel = None


class _MissingTorchvision:
    """Stands for a torchvision name that spandrel imports but our models never call."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(f"torchvision.{self._name} is needed by this spandrel architecture; "
                          "torchvision is not installed (it does not import beside this torch build)")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingTorchvision(f"{self._name}.{attr}")


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _MissingTorchvision(f"{name[len('torchvision.'):]}.{attr}".lstrip("."))
    return module


def _torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # a build that does not match this torch fails in its C extension
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def import_spandrel():
    """spandrel, imported once (with torchvision placeholders where torchvision is missing)."""
    global _spandrel
    if _spandrel is not None:
        return _spandrel
    if "spandrel" in sys.modules or _torchvision_importable():
        import spandrel
    else:
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        placeholders = {name: _placeholder_module(name) for name in names}
        placeholders["torchvision"].transforms = placeholders["torchvision.transforms"]
        placeholders["torchvision.transforms"].functional = placeholders["torchvision.transforms.functional"]
        sys.modules.update(placeholders)
        try:
            import spandrel
        finally:
            # Only for the import: nothing else in the process may take them for torchvision.
            for name, module in placeholders.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
    _spandrel = spandrel
    return spandrel


def spandrel_version() -> str:
    return import_spandrel().__version__


class ForeignGenerator(nn.Module):
    """A spandrel-built model with what the Upscaler needs as plain attributes.

    ``forward`` runs the model as spandrel's descriptor does (some architectures return
    a tuple or need a call of their own) but does no padding: the Upscaler pads to the
    size requirement, the same way spandrel does (reflect, then replicate).
    """

    def __init__(self, descriptor):
        super().__init__()
        self.net = descriptor.model
        self._call_fn = descriptor._call_fn  # spandrel keeps each architecture's call here
        self.spandrel_arch = descriptor.architecture.id
        self.arch_name = ARCH_PREFIX + self.spandrel_arch
        self.scale = int(descriptor.scale)
        requirement = descriptor.size_requirements
        self.size_minimum = int(requirement.minimum)
        self.size_multiple = int(requirement.multiple_of)
        self.size_square = bool(requirement.square)
        self.pad_mode = "reflect"
        self.supports_half = bool(descriptor.supports_half)
        self.supports_bfloat16 = bool(descriptor.supports_bfloat16)
        self.tiling = TILING_NAMES[descriptor.tiling.value]
        self.purpose = descriptor.purpose
        self.hparams = {"num_in_ch": int(descriptor.input_channels),
                        "num_out_ch": int(descriptor.output_channels),
                        "scale": self.scale, "tags": list(descriptor.tags)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call_fn(self.net, x)

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the architecture's own key layout (its released files' keys)."""
        return self.net.state_dict()

    def describe(self) -> dict:
        """What spandrel says about the model (recorded in summaries and converted files)."""
        return {"arch": self.arch_name, "scale": self.scale, "input_channels": self.hparams["num_in_ch"],
                "output_channels": self.hparams["num_out_ch"], "tags": self.hparams["tags"],
                "size_requirements": {"minimum": self.size_minimum, "multiple_of": self.size_multiple,
                                      "square": self.size_square},
                "supports_half": self.supports_half, "supports_bfloat16": self.supports_bfloat16,
                "tiling": self.tiling, "purpose": self.purpose}


# Bounds on what a file may make spandrel build. spandrel reads hyperparameters off the
# keys and shapes (a sequence's length is its largest key index + 1, a width a tensor's
# dimension) and builds the model before it loads the tensors into it, so a file with
# one key "layers.99999999.x" or one tensor of a huge dimension (possibly holding no
# elements) would have it build 10^8 layers or allocate terabytes.
# Every layer of a sequence holds at least one tensor, with at most a few parameterless
# modules (activations) between: indices beyond this multiple of the tensor count are lies.
SEQUENCE_INDEX_FACTOR = 4
SEQUENCE_INDEX_SLACK = 16
# What building may allocate: the file's own tensors several times over (weights, their
# initialisation, buffers such as attention masks) plus room for small models.
CONSTRUCTION_FACTOR = 8
CONSTRUCTION_SLACK_BYTES = 512 * 2**20


def _check_sequence_indices(url: str, state: dict[str, torch.Tensor]) -> None:
    from sr_core.modelformat import ModelFileError

    bound = SEQUENCE_INDEX_FACTOR * len(state) + SEQUENCE_INDEX_SLACK
    for key in state:
        for part in key.split("."):
            if part.isdigit() and int(part) > bound:
                raise ModelFileError(f"{url}: key {key[:120]!r} claims a sequence index of {int(part)}, but the "
                                     f"file holds {len(state)} tensors; the keys do not describe a real model")


def construction_limit_bytes(state: dict[str, torch.Tensor]) -> int:
    held = sum(t.numel() * t.element_size() for t in state.values())
    return CONSTRUCTION_FACTOR * held + CONSTRUCTION_SLACK_BYTES


class _AllocationBound(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every tensor made while spandrel builds a model and stops the
    build (``ModelFileError``) past ``limit``: checked on each factory call's requested
    size, before the memory is touched."""

    def __init__(self, url: str, limit: int):
        super().__init__()
        self.url, self.limit, self.total = url, limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _FACTORIES and args and isinstance(args[0], (list, tuple)):
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            numel = 1
            for n in args[0]:
                numel *= max(int(n), 0)
            self.total += numel * torch.empty((), dtype=dtype).element_size()
            if self.total > self.limit:
                from sr_core.modelformat import ModelFileError

                raise ModelFileError(f"{self.url}: the model its tensors describe would need more than "
                                     f"{self.limit / 2**20:.0f} MiB to build, far more than the file holds; "
                                     "the file's shapes do not describe a real model")
        return func(*args, **kwargs)


_FACTORIES = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.zeros, torch.ops.aten.ones,
              torch.ops.aten.full, torch.ops.aten.rand, torch.ops.aten.randn}


def load_foreign(url: str, state: dict[str, torch.Tensor], expected_arch: str | None = None) -> ForeignGenerator:
    """Build the model that spandrel recognizes in ``state`` (already read safely).

    ``expected_arch``: the architecture our metadata names (``spandrel:ID``); the tensors
    must be that architecture. Raises ``ValueError`` (``ModelFileError``) in one line.
    """
    from sr_core.modelformat import ModelFileError

    try:
        spandrel = import_spandrel()
    except ImportError as exc:
        raise ModelFileError(f"{url}: not one of our own layouts, and spandrel, which loads other "
                             f"architectures, is not installed ({exc}); install it with "
                             "`pip install --no-deps spandrel==0.4.2 einops`") from None
    state = spandrel.canonicalize_state_dict(state)
    _check_sequence_indices(url, state)
    try:
        with _AllocationBound(url, construction_limit_bytes(state)):
            descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except ModelFileError:
        raise
    except spandrel.UnsupportedModelError:
        sample = ", ".join(sorted(state)[:4])
        raise ModelFileError(
            f"{url}: unrecognized weight layout (keys begin {sample}, ...); supported: ESRGAN/Real-ESRGAN "
            "RRDBNet (BasicSR, ESRGAN-repository or oldest model.N layout), Real-ESRGAN's compact "
            f"SRVGGNetCompact, and the architectures spandrel {spandrel.__version__} detects (SwinIR, "
            "Swin2SR, HAT, DAT, OmniSR, SPAN, Real-CUGAN, PLKSR, RGT, ATD, DRCT, ...)") from None
    except Exception as exc:  # a recognized architecture whose tensors do not fit it
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelFileError(f"{url}: spandrel recognized the keys but could not build the model "
                             f"({type(exc).__name__}: {first}); the file is damaged or incomplete") from None
    arch_id = descriptor.architecture.id
    if expected_arch is not None and ARCH_PREFIX + arch_id != expected_arch:
        raise ModelFileError(f"{url}: the metadata names {expected_arch}, but the tensors are "
                             f"{ARCH_PREFIX}{arch_id}; the file is damaged or was edited")
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in RUNNABLE_PURPOSES:
        raise ModelFileError(f"{url}: a {arch_id} model is for {descriptor.purpose.lower()}, not super-resolution "
                             "or restoration of whole images; sr runs image-to-image models only")
    if descriptor.input_channels != descriptor.output_channels:
        raise ModelFileError(f"{url}: the {arch_id} model maps {descriptor.input_channels} channels to "
                             f"{descriptor.output_channels}; sr runs models with as many output channels as input")
    return ForeignGenerator(descriptor).eval()


def foreign_metadata(model: ForeignGenerator, /, **provenance) -> dict[str, str]:
    """Our self-describing metadata for a foreign model: loading the file needs spandrel
    again (the architecture's code is spandrel's), which the ``requires`` entry says."""
    from sr_core.modelformat import FORMAT, FORMAT_VERSION

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": model.arch_name,
            "hparams": json.dumps(model.hparams, sort_keys=True), "scale": str(model.scale),
            "requires": f"spandrel=={spandrel_version()}",
            "description": json.dumps(model.describe(), sort_keys=True)}
    if provenance:
        meta["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
    return meta


def save_foreign(model: ForeignGenerator, url: str, /, **provenance) -> None:
    """Write a foreign model as our ``.safetensors``: the architecture's own keys, our
    metadata (loading it needs spandrel: the architecture's code is spandrel's)."""
    from safetensors.torch import save as safetensors_save

    from sr_core import storage

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.native_state_dict().items()}
    storage.write_bytes(url, safetensors_save(state, metadata=foreign_metadata(model, **provenance)))


def save_foreign_pth(model: ForeignGenerator, url: str, /, **provenance) -> None:
    """Write a foreign model as the ``.pth`` its project and chaiNNer read: ``{"params":
    state}`` in the architecture's own keys, plus our metadata (plain strings)."""
    import io

    from sr_core import storage
    from sr_core.modelformat import PTH_METADATA_KEY

    buf = io.BytesIO()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.native_state_dict().items()}
    torch.save({"params": state, PTH_METADATA_KEY: foreign_metadata(model, **provenance)}, buf)
    storage.write_bytes(url, buf.getvalue())
