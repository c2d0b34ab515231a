#!/usr/bin/env bash
# Pack Ray Serve and the wheels our app needs for the device machine (Python 3.12, no internet).
# Ray's wheel (79 MB) is over the 64 MiB carry limit: unpack it, leave out what Serve never
# imports (Java jars, RLlib, Tune, Train, Data, LLM, the dashboard's web client), and
# recompress with xz: 28 MB. Output: .devcarry/ (git-ignored); carry it and, on the device,
# `source benchmarks/device_setup.sh` (see benchmarks/NOTES-gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/.devcarry; mkdir -p "$out/deps"; tmp=$(mktemp -d)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
          --platform manylinux1_x86_64 -d "$1" "${@:2}"; }
get "$tmp" ray==2.60.0
(cd "$tmp" && unzip -q ray-*.whl -d slim && cd slim && \
 rm -rf ray/jars ray/rllib ray/tune ray/train ray/data ray/llm ray/dashboard/client/build && \
 tar cf - . | xz -T0 -6 > "$out/ray-slim.tar.xz")
# What Serve, our app and the load benchmark import that the device image lacks (versions as
# pinned by this machine's install; grpcio-reflection matches the image's grpcio 1.84).
get "$out/deps" pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.55.0 watchfiles==1.3.0 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 \
    aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2 \
    opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
    google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 \
    pyasn1==0.6.3 pyasn1_modules==0.4.2 rsa==4.7.2 smart_open==9.0.4 platformdirs==4.14.9 \
    grpcio-reflection==1.84.0 mmh3==5.3.1 redis==8.1.0 openai==3.57.0 jiter==0.19.0 sniffio==1.3.1 \
    httpx2==2.16.2 anyio==4.16.0 httpcore2==2.16.2 idna==3.20 truststore==0.10.5 gguf==0.19.0 \
    pyzmq==27.3.0 cloudpickle==3.1.3
rm -rf "$tmp"
du -sh "$out"
