"""Shared fixtures: tiny random models built from configs, real photos, manifests.

Nothing here touches a model hub: HF_HUB_OFFLINE=1 makes a stray hub lookup
fail at once.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# img2dataset imports albumentations, which otherwise asks PyPI for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Converted and copied models go to a per-session cache, not ~/.cache."""
    cache = tmp_path_factory.mktemp("image-labeler-cache")
    old = os.environ.get("IMAGE_LABELER_CACHE")
    os.environ["IMAGE_LABELER_CACHE"] = str(cache)
    yield
    if old is None:
        os.environ.pop("IMAGE_LABELER_CACHE", None)
    else:
        os.environ["IMAGE_LABELER_CACHE"] = old


def _save_vit(path: Path, *, num_labels: int, problem_type: Any) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(  # type: ignore[call-arg]  # num_labels etc. go to PreTrainedConfig
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
        problem_type=problem_type,
    )
    model = ViTForImageClassification(config).eval()
    # Spread the logits so top-k orders are well separated in every test.
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-label (softmax) ViT with 7 labels, random weights."""
    return _save_vit(tmp_path_factory.mktemp("tiny-vit"), num_labels=7, problem_type=None)


@pytest.fixture(scope="session")
def tiny_multilabel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label (sigmoid) ViT with 5 labels, random weights."""
    return _save_vit(
        tmp_path_factory.mktemp("tiny-vit-ml"),
        num_labels=5,
        problem_type="multi_label_classification",
    )


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN with batch norms (channels_last in our handler), random weights."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(  # type: ignore[call-arg]
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=6,
        id2label={i: f"kind_{i}" for i in range(6)},
        label2id={f"kind_{i}": i for i in range(6)},
    )
    model = randomize_batchnorms(ResNetForImageClassification(config).eval())
    with torch.no_grad():
        model.classifier[-1].weight.mul_(20.0)
    path = tmp_path_factory.mktemp("tiny-resnet")
    model.save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 48}).save_pretrained(path)
    return path


def randomize_batchnorms(
    model: Any,
    *,
    mean: tuple[float, float] = (-0.5, 0.5),
    var: tuple[float, float] = (0.5, 2.0),
    weight: tuple[float, float] | None = None,
    bias: tuple[float, float] | None = None,
) -> Any:
    """Uniform random batch-norm statistics (and, if given, affine parameters), so
    folding or rewriting the layers around them changes logits when done wrong;
    freshly built models have mean 0, variance 1. Returns `model`."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(*mean)
                module.running_var.uniform_(*var)
                if weight is not None:
                    module.weight.uniform_(*weight)
                if bias is not None:
                    module.bias.uniform_(*bias)
    return model


def real_photo(name: str) -> Image.Image:
    """A real photo that ships with scikit-image, as RGB."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def real_thumbnails(max_side: int) -> list[Image.Image]:
    """Four real photos (a cat, coffee, a person, a rocket), shrunk to `max_side`."""
    images = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        image = real_photo(name)
        image.thumbnail((max_side, max_side))
        images.append(image)
    return images


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos at small sizes, as JPEG and PNG files."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        image = real_photo(name)
        image.thumbnail((160, 160))
        image.save(root / f"{name}.jpg", quality=90)
        image.save(root / f"{name}.png")
    # A grayscale photo and one with an alpha channel.
    real_photo("camera").convert("L").resize((96, 96)).save(root / "camera_gray.png")
    rgba = real_photo("coffee").resize((80, 60)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "coffee_rgba.png")
    return root


@pytest.fixture()
def random_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))


def _clip_tokenizer() -> Any:
    """A character-level CLIP tokenizer: every letter is a token, no merges."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,'-!?{}":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model with a local tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer.get_vocab()),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=16))
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SigLIP model with a small word-level fast tokenizer."""
    import string

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    path = tmp_path_factory.mktemp("tiny-siglip")
    words = ["<pad>", "<unk>", "</s>", *string.ascii_lowercase, ".", ",", "{", "}"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # Characters as words, so every label gets its own token sequence.
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=64,
    )
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=_VISION))
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """A GCS emulator on loopback; gcsfs and Beam's gcsio both talk to it.

    Yields the bucket name. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false stops gcsfs
    from waiting 60 s per call on a gRPC probe the emulator cannot answer.
    """
    import socket
    import subprocess
    import sys
    import time

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    bucket = "labeler-test"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            bucket,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {
        k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    }
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.2)
    try:
        yield bucket
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_output(directory: Path) -> Any:
    """A job's output directory, read as one pyarrow Table the way users read it
    (`pq.read_table(OUT)`: the folder is the dataset)."""
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in Path(directory).glob("part-*.parquet"))
    assert files, f"no shards in {directory}"
    table = pq.read_table(str(directory))
    assert table.num_rows == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return table


def default_fetch(**changes: Any) -> Any:
    """The declared default fetch options (`LabelingSpec().fetch`) with `changes`."""
    import dataclasses

    from transforms.spec import LabelingSpec

    return dataclasses.replace(LabelingSpec().fetch, **changes)


def run_job(args: list[str]) -> int:
    """Run the label-images job in this process, quietly; its exit code."""
    from pipelines.label_images import run

    return run([*args, "--progress", "false"], save_main_session=False)


def classifier_handler(model: Any, **options: Any) -> Any:
    """An image-classification handler on CPU for a model directory, options as the CLI's."""
    from transforms.model.image_classification import ImageClassificationModelHandler
    from transforms.spec import LabelingSpec

    options.setdefault("device", "cpu")
    return ImageClassificationModelHandler(LabelingSpec(model=str(model), **options).handler)


def zero_shot_handler(
    model: Any,
    labels: Any,
    templates: Any = None,
    *,
    text_batch_size: int | None = None,
    **options: Any,
) -> Any:
    """A zero-shot handler on CPU for a model directory and candidate labels."""
    from transforms.model.zero_shot import ZeroShotModelHandler
    from transforms.spec import LabelingSpec

    options.setdefault("device", "cpu")
    if templates is not None:
        options["hypothesis_template"] = tuple(templates)
    spec = LabelingSpec(
        model=str(model),
        task="zero-shot-image-classification",
        candidate_labels=tuple(labels),
        **options,
    )
    if text_batch_size is None:
        return ZeroShotModelHandler(spec.handler)
    return ZeroShotModelHandler(spec.handler, text_batch_size=text_batch_size)


def run_cli(args: list[str], timeout: float = 300) -> Any:
    """`python -m pipelines.label_images ARGS` in a fresh process; the CompletedProcess."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "pipelines.label_images", *args],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str]) -> Any:
    """`python -m pipelines.label_images ARGS --progress false` started in a fresh process
    and session (kill -9 of its group takes the worker processes too); the Popen."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.label_images", *args, "--progress", "false"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when_committed(out: Path, parts: int, job: Any, timeout_s: float = 120) -> None:
    """kill -9 a `start_cli` job (its whole process group) once `out` holds `parts`
    committed part files."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(list(out.glob("part-*.parquet"))) < parts:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no part file was committed"
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
