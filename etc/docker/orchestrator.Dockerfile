# syntax=docker/dockerfile:1
# A GPU node: CUDA torch, then the package with its orchestrator extra (diffusers). From the repository root:
#   docker build -f etc/docker/orchestrator.Dockerfile -t t2i-orchestrator .
#   docker run --rm --gpus 1 -p 8936:8936 -v hf-cache:/var/cache/huggingface \
#       -e T2I_ORCHESTRATOR_SECRET=... t2i-orchestrator --models /etc/t2i/models.json --device cuda
# Models are not in the image: they come from the Hugging Face cache on the volume at $HF_HOME, e.g.
#   docker run --rm -v hf-cache:/var/cache/huggingface --entrypoint hf t2i-orchestrator download stabilityai/sd-turbo
# Pick the CUDA of your drivers with --build-arg CUDA_IMAGE=... and TORCH_INDEX=... (the same CUDA version;
# the torch wheels bring their own CUDA libraries, the base image the matching runtime and driver hooks).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# Keep TORCH_VERSION the torch pin of constraints.txt (the tests check it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/t2i/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12; unpinned, as the base image's release already fixes its version.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# torch FIRST, the CUDA build from the PyTorch index, in a layer of its own (a few GB, cached across source
# changes): the package's torch>=2.6 range and the constraints' torch pin then keep it.
RUN python3 -m venv /opt/t2i/venv \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Then the package with its orchestrator extra, sources through a bind mount, versions from constraints.txt.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --constraint /src/constraints.txt "/src[orchestrator]"

# A non-root user with a fixed uid (the Kubernetes manifests name it), owning the model cache (so that a new
# named volume mounted there is writable) and the node's state folder.
RUN groupadd --system --gid 10001 t2i \
    && useradd --system --uid 10001 --gid t2i --create-home --home-dir /home/t2i --shell /usr/sbin/nologin t2i \
    && mkdir -p /var/cache/huggingface /var/lib/t2i \
    && chown t2i:t2i /var/cache/huggingface /var/lib/t2i

ENV HF_HOME=/var/cache/huggingface \
    T2I_ORCHESTRATOR_HOST=0.0.0.0 \
    T2I_ORCHESTRATOR_STORAGE_DIR=/var/lib/t2i/images \
    T2I_ORCHESTRATOR_CACHE_DIR=/var/lib/t2i/cache
VOLUME ["/var/cache/huggingface"]

USER 10001:10001
WORKDIR /var/lib/t2i
EXPOSE 8936
# SIGTERM drains (up to --shutdown-grace, 120 s) and leaves the registry: give `docker stop` -t 150.
STOPSIGNAL SIGTERM
ENTRYPOINT ["t2i-orchestrator"]
