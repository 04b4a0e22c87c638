"""VGG19 feature extractor for the perceptual loss (ESRGAN uses conv5_4 before ReLU).

The layer stack is torchvision's ``vgg19().features`` written out here (no torchvision
dependency), with the same indices, so a torchvision ImageNet state dict
(``features.N.weight``/``.bias``) loads directly. The network is cut after the last
requested layer: nothing deeper is built or run.

"Before activation" matters: ESRGAN takes conv outputs, not ReLU outputs, because the
activated deep features are very sparse and give weaker supervision (ESRGAN paper, 3.3).
So the ReLUs here are not in-place: an in-place ReLU would overwrite the conv output we
return.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_core import modelfile

# torchvision's VGG19 configuration "E": conv widths per block, each block ends in a max-pool.
BLOCK_WIDTHS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _all_layer_names() -> list[str]:
    """Names of ``features`` in index order: conv1_1, relu1_1, conv1_2, relu1_2, pool1, ..."""
    names = []
    for block, widths in enumerate(BLOCK_WIDTHS, start=1):
        for conv in range(1, len(widths) + 1):
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
        names.append(f"pool{block}")
    return names


LAYER_NAMES = _all_layer_names()
LAYER_INDEX = {name: index for index, name in enumerate(LAYER_NAMES)}


def build_features(num_layers: int) -> nn.Sequential:
    """The first ``num_layers`` modules of VGG19 ``features``."""
    layers: list[nn.Module] = []
    in_channels = 3
    for widths in BLOCK_WIDTHS:
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    assert len(layers) == len(LAYER_NAMES)
    return nn.Sequential(*layers[:num_layers])


class VGG19FeatureExtractor(nn.Module):
    """Named VGG19 feature maps of a BCHW image batch in [0, 1].

    ``layer_names``: any of ``LAYER_NAMES`` (``convX_Y`` is the conv output, before its
    ReLU). ``weights``: a local path or fsspec URL of a torchvision-format VGG19 state
    dict (.pth loaded with ``weights_only=True``, or .safetensors); ``classifier.*``
    keys are ignored. ``None`` leaves random weights (tests; a perceptual loss needs
    the ImageNet weights to mean anything).
    """

    def __init__(
        self,
        layer_names: list[str],
        use_input_norm: bool = True,
        weights: str | None = None,
        requires_grad: bool = False,
    ):
        super().__init__()
        if isinstance(layer_names, str) or not layer_names:
            raise ValueError(f"VGG19FeatureExtractor: layer_names must be a non-empty list, got {layer_names!r}")
        unknown = [name for name in layer_names if name not in LAYER_INDEX]
        if unknown:
            raise ValueError(f"VGG19FeatureExtractor: unknown layer(s) {unknown}; known: {', '.join(LAYER_NAMES)}")
        self.layer_names = list(dict.fromkeys(layer_names))
        self.use_input_norm = use_input_norm
        last = max(LAYER_INDEX[name] for name in self.layer_names)
        self.features = build_features(last + 1)
        self._wanted = {LAYER_INDEX[name]: name for name in self.layer_names}
        # Not persistent: the state dict holds only torchvision's features.N keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_torchvision_weights(weights)
        # Frozen by default: the perceptual loss trains the generator, not VGG. Gradients
        # still flow through to the input.
        self.requires_grad_(requires_grad)

    def load_torchvision_weights(self, url: str) -> None:
        """Load ``features.N.*`` tensors from a torchvision VGG19 state-dict file."""
        state, _ = modelfile.read_model_file(url)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        stray = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
        if stray or not features:
            raise ValueError(
                f"{url}: not a torchvision VGG19 state dict (expected features.N.weight/bias keys; "
                f"found e.g. {', '.join(sorted(stray or state)[:4])})"
            )
        own = self.features.state_dict()
        missing = sorted(f"features.{k}" for k in own if f"features.{k}" not in features)
        if missing:
            raise ValueError(f"{url}: VGG19 weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        for key, tensor in own.items():
            loaded = features[f"features.{key}"]
            if loaded.shape != tensor.shape:
                raise ValueError(
                    f"{url}: features.{key} has shape {tuple(loaded.shape)}, VGG19 needs {tuple(tensor.shape)}"
                )
        # Deeper layers than we built (we truncate) are simply not needed.
        self.features.load_state_dict({key: features[f"features.{key}"] for key in own}, strict=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        out = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._wanted:
                out[self._wanted[index]] = x
        return out
