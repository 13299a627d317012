# syntax=docker/dockerfile:1
# The gateway: the package without its orchestrator extra (aiohttp, no torch). From the repository root:
#   docker build -f etc/docker/gateway.Dockerfile -t t2i-gateway .
#   docker run --rm -p 8935:8935 -e T2I_GATEWAY_STREAM_SECRET=... -e T2I_GATEWAY_ORCHESTRATOR_SECRET=... \
#       t2i-gateway --registry redis://redis:6379/0
# Every flag also works as T2I_GATEWAY_<FLAG> in the environment.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/t2i/venv/bin:$PATH

# The sources come in through a bind mount (nothing of them stays in a layer but the installed package);
# constraints.txt pins the versions the test suite runs with. A non-root user with a fixed uid, which the
# Kubernetes manifests name too.
RUN --mount=type=bind,source=.,target=/src,rw \
    python -m venv /opt/t2i/venv \
    && pip install --constraint /src/constraints.txt /src \
    && groupadd --system --gid 10001 t2i \
    && useradd --system --uid 10001 --gid t2i --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin t2i

USER 10001:10001
WORKDIR /tmp
# In a container the gateway listens on every interface (its own default is 127.0.0.1).
ENV T2I_GATEWAY_HOST=0.0.0.0
EXPOSE 8935
# SIGTERM drains (up to --shutdown-grace, 120 s): give `docker stop` a longer timeout (-t 150).
STOPSIGNAL SIGTERM
ENTRYPOINT ["t2i-gateway"]
