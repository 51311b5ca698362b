# Custom SDK container for Dataflow workers (GPU, and CPU when you want fast,
# reproducible worker start-up). It must match the launcher: the same Beam and
# Python versions as pyproject.toml (tests/test_packaging.py checks the pins).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/image-labeler-gpu:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/image-labeler-gpu:0.1.0
#   label-images --config configs/dataflow-gpu.yaml \
#     --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/image-labeler-gpu:0.1.0 ...
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGE_LABELER_CACHE=/opt/image-labeler/cache

WORKDIR /opt/image-labeler/src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY configs ./configs

# PyPI's default torch wheel for Linux x86_64 is the CUDA build; the pair is
# pinned like in the README, in the same pip command as the project.
RUN pip install "torch==2.14.1" "torchvision==0.29.1" ".[gcp]"

# Convert the default model once, at build time, so workers start labeling at once.
RUN python -c "from transforms.model.default_model import default_model_dir; print(default_model_dir())"

# The Beam SDK harness stays the entry point.
ENTRYPOINT ["/opt/apache/beam/boot"]
