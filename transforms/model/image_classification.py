"""A torch-only RunInference ModelHandler for `AutoModelForImageClassification`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from transforms.model.device import batch_to_device
from transforms.model.handler_base import TorchHandlerBase
from transforms.model.loading import load_pretrained, model_facts
from transforms.model.pixels import Normalization
from transforms.model.postprocess import resolve_function
from transforms.model.settings import HandlerSettings
from transforms.model.speedups.batchnorm import fold_batchnorm
from transforms.model.speedups.compiled import CompiledForward
from transforms.model.speedups.static_padding import make_tf_padding_static

logger = logging.getLogger(__name__)


def preferred_memory_format(model: Any) -> Any:
    """channels_last for convolutional models, None (as loaded) for the rest.

    oneDNN and cuDNN run convolutions in NHWC without layout conversions; a
    MobileNetV2 forward on 2 CPU cores goes from ~33 to ~65 images/s.
    Transformers (ViT, CLIP) gain nothing, so they are left alone.
    """
    import torch

    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        if convs > 4:  # more than a patch-embedding stem
            return torch.channels_last
    return None


def streamline_classifier(model: Any, device: str) -> tuple[int, int]:
    """Rewrite an image classifier's layers for inference, in place: static padding
    for TF-padded convolutions (`transforms.model.speedups.static_padding`), then batch norms
    folded into their convolutions (`transforms.model.speedups.batchnorm`). Each step is checked
    on one random image of the config's size and undone if the logits change.

    Returns:
        (layers given static padding, batch norms folded).
    """
    example = example_input(model.config, device)

    def run(x: Any) -> Any:
        return model(pixel_values=x).logits

    return make_tf_padding_static(model, run, example), fold_batchnorm(model, run, example)


def example_input(config: Any, device: str) -> Any:
    """One random image of the size the model's config names (224 px if none)."""
    import torch

    side: Any = getattr(config, "image_size", None)
    pretrained = getattr(config, "pretrained_cfg", None)  # timm models
    if isinstance(pretrained, dict) and "input_size" in pretrained:
        side = pretrained["input_size"][-1]
    if isinstance(side, (list, tuple)):
        side = side[-1]
    side = side if isinstance(side, int) and side > 0 else 224
    channels = getattr(config, "num_channels", 3) or 3
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, channels, side, side, generator=generator).to(device)


#: Attribute names of the classification head, tried in order.
_HEAD_NAMES = ("classifier", "head", "fc", "cls_classifier")


def classifier_head_name(model: Any) -> str:
    """The qualified name of the module that turns features into logits.

    timm models (the default model, `TimmWrapperForImageClassification`) name it
    through `get_classifier()`; transformers' classifiers call it `classifier`
    (ViT, ConvNeXt, MobileNet, ResNet, Swin, ...) or `head`/`fc`. Failing those,
    the last `nn.Linear` with one output per label.

    Raises:
        ValueError: when the model has no recognizable head.
    """
    import torch

    names = {id(module): name for name, module in model.named_modules()}
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        head = timm_model.get_classifier()
        if id(head) in names and not isinstance(head, torch.nn.Identity):
            return names[id(head)]
    for attr in _HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Module) and not isinstance(head, torch.nn.Identity):
            return attr
    num_labels = int(getattr(model.config, "num_labels", 0) or 0)
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels
    ]
    if not linears:
        raise ValueError(
            f"--embeddings: cannot find the classification head of {type(model).__name__}"
        )
    return linears[-1]


class HeadInputs:
    """Keeps the input of the classification head of the calling thread's last
    forward pass (a forward pre-hook): the features the head turns into logits,
    flattened to (batch, dim). Per thread, since in-process runners call one
    loaded model from several threads at once."""

    def __init__(self, model: Any, head_name: str) -> None:
        self._local = threading.local()
        self._handle = model.get_submodule(head_name).register_forward_pre_hook(self._keep)

    def _keep(self, module: Any, args: tuple[Any, ...]) -> None:
        self._local.features = args[0]

    def take(self) -> Any:
        features = getattr(self._local, "features", None)
        self._local.features = None
        if features is None:
            raise RuntimeError("the classification head did not run")
        return features.flatten(1)


@dataclass
class LoadedClassifier:
    """A loaded model plus what postprocessing needs from its config."""

    model: Any
    device: str
    dtype: Any
    #: pixel_values -> logits: the model, or its compiled twin once ready.
    logits: CompiledForward
    memory_format: Any = None  # torch.channels_last for convolutional models
    #: Rescale and normalize of uint8 pixels (`transforms.model.pixels`).
    normalization: Normalization | None = None
    #: With `--embeddings`: the logits function returns (logits, head inputs).
    embeddings: bool = False

    def __call__(self, batch: Sequence[np.ndarray]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """A batch's logits (and embeddings), computed where the model lives."""
        return ImageClassificationModelHandler.forward(batch, self)


class ImageClassificationModelHandler(TorchHandlerBase[LoadedClassifier]):
    """Runs `AutoModelForImageClassification` on batches of preprocessed images.

    Examples are float32 `pixel_values` arrays (C, H, W) made by
    `ImagePreprocessor` on the decode workers. Each result is a `Prediction`
    (top-k labels and scores, best first), or a `RowError` for an image whose
    inference failed: a failing batch is retried one image at a time, so one
    bad image never fails its neighbours or the job.

    Example::

        spec = resolve(LabelingSpec(model="path/to/model", top_k=3), local=True)
        keyed = KeyedModelHandler(ImageClassificationModelHandler(spec.handler))
        results = keyed_pixel_values | RunInference(keyed)

    Args:
        settings: the handler's settings; `top_k` and `function_to_apply` are
            applied in postprocessing, after the forward pass.
    """

    def __init__(self, settings: HandlerSettings) -> None:
        facts = model_facts(settings.model)
        super().__init__(
            settings,
            id2label=facts.id2label,
            function=resolve_function(settings.function_to_apply, facts.config),
        )

    def _load(self, weights: Any = None) -> LoadedClassifier:
        device, dtype = self._torch_setup()
        settings = self.settings
        model = (
            weights
            if weights is not None
            else load_pretrained(settings.model, zero_shot=False, precision=settings.precision)
        )
        model.eval().to(device)
        padded, folded = streamline_classifier(model, device)
        if folded:
            logger.info("Folded %d batch norms into their convolutions", folded)
        if padded:
            logger.info("Static padding for %d TF-padded convolutions", padded)
        memory_format = preferred_memory_format(model)
        if memory_format is not None:
            model.to(memory_format=memory_format)
        head_name = classifier_head_name(model) if settings.embeddings else ""
        normalization = self._normalization()
        model = self._optimize(model, device)
        if not settings.embeddings:
            return LoadedClassifier(
                model=model,
                device=device,
                dtype=dtype,
                memory_format=memory_format,
                logits=self._forward_fn(lambda x: model(pixel_values=x).logits),
                normalization=normalization,
            )
        # The head is looked up again after `_optimize`, which may swap modules.
        head_inputs = HeadInputs(model, head_name)

        def logits_and_features(x: Any) -> Any:
            return model(pixel_values=x).logits, head_inputs.take()

        return LoadedClassifier(
            model=model,
            device=device,
            dtype=dtype,
            memory_format=memory_format,
            logits=self._forward_fn(logits_and_features),
            embeddings=True,
            normalization=normalization,
        )

    @staticmethod
    def forward(
        batch: Sequence[np.ndarray], model: LoadedClassifier
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The hot path: stack, one forward pass, float32 logits back on the host
        (with the L2-normalized head inputs when `model.embeddings`)."""
        import torch

        with torch.inference_mode():
            pixel_values = batch_to_device(
                batch, model.device, model.dtype, model.normalization, model.memory_format
            )
            output = model.logits(pixel_values)
            if not model.embeddings:
                return np.asarray(output.float().cpu().numpy())
            logits, features = output
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return (
            np.asarray(logits.float().cpu().numpy()),
            np.asarray(features.cpu().numpy(), dtype=np.float32),
        )
