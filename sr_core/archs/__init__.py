"""Architecture registries: plain dicts from the name a config or model file uses to
the class, and from (name, variant) to hyperparameters. No decorators, no import
scanning, no fallback names: an unknown name is a ValueError listing the known ones.

Every generator class has ``arch_name``, ``self.hparams`` (its constructor arguments,
JSON-serializable, enough to rebuild it), ``self.scale`` and ``self.size_multiple``
(input height/width must be a multiple of it; the Upscaler pads).

Every discriminator class has ``arch_name``, ``self.hparams``, ``self.input_size``
(the one crop size it accepts, or None for any), ``self.size_multiple`` and
``self.min_input_size``; it returns raw logits (no sigmoid).

Every architecture's file has ``check_hparams(hparams)``, which its constructor calls
first: ranges of every hyperparameter and the size its weights would take, refused in
one line before a layer is built (``sr_core.archs.limits``). :func:`check_hparams` runs
it for a name and variant without building anything (configs, model-file writers).
"""

from __future__ import annotations

import inspect

from torch import nn

from sr_core.archs import (
    multihead_rrdbnet,
    rrdbnet,
    srgan_discriminator,
    srresnet,
    srvgg,
    unet_discriminator,
    vgg_discriminator,
)

GENERATORS: dict[str, type[nn.Module]] = {
    "rrdbnet": rrdbnet.RRDBNet,
    "multihead_rrdbnet": multihead_rrdbnet.MultiHeadRRDBNet,
    "srresnet": srresnet.SRResNet,
    "srvgg_compact": srvgg.SRVGGNetCompact,
}

DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "vgg_style": vgg_discriminator.VGGStyleDiscriminator,
    "vgg_style_any": vgg_discriminator.VGGStyleDiscriminatorAnySize,
    "srgan": srgan_discriminator.SRGANDiscriminator,
    "unet_sn": unet_discriminator.UNetDiscriminatorSN,
}

# Named hyperparameter sets ("variants") per architecture (generators and discriminators share the
# namespace); every architecture has "tiny" for CPU.
VARIANTS: dict[str, dict[str, dict]] = {
    "rrdbnet": rrdbnet.VARIANTS,
    "multihead_rrdbnet": multihead_rrdbnet.VARIANTS,
    "srresnet": srresnet.VARIANTS,
    "srvgg_compact": srvgg.VARIANTS,
    "vgg_style": vgg_discriminator.VARIANTS,
    "vgg_style_any": vgg_discriminator.VARIANTS_ANY_SIZE,
    "srgan": srgan_discriminator.VARIANTS,
    "unet_sn": unet_discriminator.VARIANTS,
}


# name -> the architecture's own check of a complete set of hyperparameters.
CHECKS = {
    "rrdbnet": rrdbnet.check_hparams,
    "multihead_rrdbnet": multihead_rrdbnet.check_hparams,
    "srresnet": srresnet.check_hparams,
    "srvgg_compact": srvgg.check_hparams,
    "vgg_style": vgg_discriminator.check_hparams,
    "vgg_style_any": lambda hparams: vgg_discriminator.check_hparams({**hparams, "input_size": 128}, "vgg_style_any"),
    "srgan": srgan_discriminator.check_hparams,
    "unet_sn": unet_discriminator.check_hparams,
}


def check_hparams(name: str, variant: str | None = None, **hparams) -> dict:
    """The complete hyperparameters of ``name`` (its defaults, then the variant's, then
    ``hparams``), checked as its constructor would, without building anything; a
    ``ValueError`` names what is wrong."""
    registry = GENERATORS if name in GENERATORS else DISCRIMINATORS
    kind = "generator" if name in GENERATORS else "discriminator"
    cls, merged = _merged(registry, kind, name, variant, hparams)
    complete = {key: p.default for key, p in inspect.signature(cls.__init__).parameters.items() if key != "self"}
    complete.update(merged)
    CHECKS[name](complete)
    return complete


def _merged(registry: dict, kind: str, name: str, variant: str | None, hparams: dict) -> tuple[type, dict]:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    cls = registry[name]
    variants = VARIANTS.get(name, {})
    if variant is not None and variant not in variants:
        raise ValueError(f"{name}: unknown variant {variant!r}; known: {', '.join(sorted(variants)) or 'none'}")
    merged = {**(variants[variant] if variant else {}), **hparams}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(merged) - accepted)
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; accepted: {sorted(accepted)}")
    return cls, merged


def _build(registry: dict, kind: str, name: str, variant: str | None, hparams: dict) -> nn.Module:
    cls, merged = _merged(registry, kind, name, variant, hparams)
    return cls(**merged)


def build_generator(name: str, variant: str | None = None, **hparams) -> nn.Module:
    """Build a generator by registry name, e.g. ``build_generator("rrdbnet", "tiny", scale=2)``."""
    return _build(GENERATORS, "generator", name, variant, hparams)


def build_discriminator(name: str, variant: str | None = None, **hparams) -> nn.Module:
    return _build(DISCRIMINATORS, "discriminator", name, variant, hparams)
