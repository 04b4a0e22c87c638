"""The checks of a built config that involve several fields or a registry (the ranges of
single fields are declared in the schema and checked by ``jobs.config.typed``), and the
checks that read storage (:func:`check_inputs`)."""

from __future__ import annotations

from jobs.config.schema import MAX_STEPS, MAX_VAL_CROP, Config
from jobs.config.typed import check_ranges
from sr_core.errors import shown


def validate(config: Config) -> None:
    """Every field within its declared range, then the checks across fields, section by section."""
    check_ranges(config)
    for check in (validate_data, validate_model, validate_loss, validate_optim, validate_train,
                  validate_degradation):
        check(config)


def validate_data(config: Config) -> None:
    d = config.data
    if d.gt_size % d.scale:
        raise ValueError(f"data.gt_size ({d.gt_size}) must be a positive multiple of data.scale ({d.scale})")
    if d.val_center_crop and (d.val_center_crop % d.scale or not 0 < d.val_center_crop <= MAX_VAL_CROP):
        raise ValueError(f"data.val_center_crop must be 0 (whole images) or a positive multiple of data.scale "
                         f"({d.scale}) up to {MAX_VAL_CROP}, got {d.val_center_crop}")
    from sr_core.degradations import PROBABILITY_FIELDS

    unknown = sorted(set(d.degradation_probs) - set(PROBABILITY_FIELDS))
    if unknown:
        raise ValueError(f"data.degradation_probs: unknown degradation(s) {unknown}; "
                         f"known: {', '.join(PROBABILITY_FIELDS)}")
    if d.train_shards and (d.train_hr or d.train_lr):
        raise ValueError("set either data.train_shards or data.train_hr + data.train_lr, not both")
    if bool(d.train_hr) != bool(d.train_lr):
        raise ValueError("paired training needs both data.train_hr and data.train_lr")


def _check_registry_names(config: Config) -> None:
    from sr_core.archs import DISCRIMINATORS, GENERATORS, VARIANTS

    m = config.model
    for kind, name, variant, registry in (("generator", m.generator, m.generator_variant, GENERATORS),
                                          ("discriminator", m.discriminator, m.discriminator_variant, DISCRIMINATORS)):
        if kind == "discriminator" and config.train.stage != "gan":
            continue
        if not name:
            who = "the GAN stage needs a" if kind == "discriminator" else "the run needs a"
            raise ValueError(f"model.{kind} is empty; {who} {kind}: one of {', '.join(sorted(registry))}")
        if name not in registry:
            raise ValueError(f"model.{kind}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
        if variant and variant not in VARIANTS.get(name, {}):
            raise ValueError(f"model.{kind}_variant: {name} has no variant {variant!r}; known: "
                             f"{', '.join(sorted(VARIANTS.get(name, {})))}")


def validate_model(config: Config) -> None:
    from sr_core.archs import VARIANTS, check_hparams

    _check_registry_names(config)
    m = config.model
    if "scale" in m.generator_options:
        raise ValueError("model.generator_options.scale: the scale is data.scale")
    # Every hyperparameter's range and the networks' size, before any process starts
    # (torch would fail on a width of 0 with its own traceback, or build for minutes).
    checks = [("model.generator_options", m.generator, m.generator_variant,
               {"scale": config.data.scale, **m.generator_options})]
    if config.train.stage == "gan":
        checks.append(("model.discriminator_options", m.discriminator, m.discriminator_variant,
                       m.discriminator_options))
    for field_name, name, variant, options in checks:
        try:
            check_hparams(name, variant or None, **options)
        except ValueError as exc:
            raise ValueError(f"{field_name}: {exc}") from None
    if config.train.stage == "gan":
        d_hparams = {**VARIANTS.get(m.discriminator, {}).get(m.discriminator_variant, {}), **m.discriminator_options}
        input_size = d_hparams.get("input_size")
        if input_size is not None and input_size != config.data.gt_size:
            raise ValueError(f"model.discriminator {m.discriminator!r} ({m.discriminator_variant}) takes "
                             f"{input_size} px crops but data.gt_size is {config.data.gt_size}; use vgg_style_any "
                             "or a matching gt_size")


def validate_loss(config: Config) -> None:
    from sr_core.archs.vgg19 import LAYER_INDEX
    from sr_core.losses import GAN_LOSSES, PIXEL_LOSSES

    lo = config.loss
    if lo.pixel not in PIXEL_LOSSES:
        raise ValueError(f"loss.pixel: unknown pixel loss {lo.pixel!r}; known: {', '.join(sorted(PIXEL_LOSSES))}")
    if lo.gan not in GAN_LOSSES:
        raise ValueError(f"loss.gan: unknown GAN loss {lo.gan!r}; known: {', '.join(sorted(GAN_LOSSES))}")
    unknown = sorted(set(lo.perceptual_layers) - set(LAYER_INDEX))
    if unknown:
        raise ValueError(f"loss.perceptual_layers: unknown VGG19 layer(s) {shown(unknown)} (e.g. conv5_4)")
    gan = config.train.stage == "gan"
    if gan and lo.perceptual_weight > 0:
        if not lo.perceptual_layers:
            raise ValueError("loss.perceptual_layers is empty but loss.perceptual_weight > 0")
        if not lo.vgg_weights and not lo.random_vgg:
            raise ValueError("loss.vgg_weights: the perceptual loss needs torchvision's ImageNet VGG19 weights "
                             "(a path or URL of vgg19-dcbb9e9d.pth); set loss.random_vgg=true only for tests")
    if not gan and lo.pixel_weight <= 0:
        raise ValueError("loss.pixel_weight must be > 0 in the psnr stage (it is the only loss there)")


def validate_degradation(config: Config) -> None:
    deg, d = config.degradation, config.data
    try:
        deg.options(d.scale)
    except ValueError as exc:
        raise ValueError(str(exc).replace("degradation ", "degradation.", 1)) from None
    if deg.pool_size < 0 or (deg.enabled and deg.pool_size and deg.pool_size % d.batch_size):
        raise ValueError(f"degradation.pool_size ({deg.pool_size}) must be 0 or a multiple of data.batch_size "
                         f"({d.batch_size})")
    if deg.enabled and d.degradation_probs:
        raise ValueError("degradation.enabled makes the LR itself: leave data.degradation_probs empty")
    if deg.enabled and d.train_lr:
        raise ValueError("degradation.enabled makes the LR from the GT: train from data.train_shards, "
                         "not paired folders (data.train_lr)")


def validate_optim(config: Config) -> None:
    o = config.optim
    if sorted(o.milestones) != list(o.milestones) or any(not 0 < m <= MAX_STEPS for m in o.milestones):
        raise ValueError(f"optim.milestones must be increasing positive steps (at most {MAX_STEPS:,}), "
                         f"got {o.milestones}")
    if o.schedule == "cosine_restart" and (not o.periods or any(not 0 < p <= MAX_STEPS for p in o.periods)):
        raise ValueError(f"optim.periods must be positive cycle lengths (at most {MAX_STEPS:,}) for "
                         f"cosine_restart, got {o.periods}")
    # The cosine runs from each learning rate down to eta_min: above them it would climb.
    top = min(o.lr_g, o.lr_d) if config.train.stage == "gan" else o.lr_g
    if o.schedule == "cosine_restart" and not 0 <= o.eta_min <= top:
        raise ValueError(f"optim.eta_min must be from 0 to the learning rate ({top:g}), got {o.eta_min}")


def validate_train(config: Config) -> None:
    t = config.train
    if t.stage == "gan" and not t.pretrained:
        raise ValueError("train.pretrained: the GAN stage starts from the PSNR stage's generator; set it to "
                         "that run's model.safetensors")


def check_inputs(config: Config) -> None:
    """Checks that read storage: the training data, validation folder, pretrained file and
    VGG weights exist (run before any training process starts)."""
    from sr_core import storage

    d, t, lo = config.data, config.train, config.loss
    if not t.run_dir:
        raise ValueError("train.run_dir is required (a folder or URL such as gs://bucket/runs/NAME)")
    if not d.train_shards and not d.train_hr:
        raise ValueError("data.train_shards is empty: point it at the output of `sr prepare` "
                         "(or set data.train_hr + data.train_lr)")
    if d.train_shards:
        index = d.train_shards if d.train_shards.endswith("index.json") else storage.join(d.train_shards, "index.json")
        if not storage.exists(index):
            raise ValueError(f"data.train_shards: {index} does not exist; run `sr prepare SRC {d.train_shards}` first")
    for name, url in (("data.train_hr", d.train_hr), ("data.train_lr", d.train_lr), ("data.val_folder", d.val_folder),
                      ("train.pretrained", t.pretrained),
                      ("loss.vgg_weights", lo.vgg_weights if t.stage == "gan" and lo.perceptual_weight > 0
                       and not lo.random_vgg else "")):
        if url and not storage.exists(url):
            raise ValueError(f"{name}: {url} does not exist")
