# syntax=docker/dockerfile:1.7
#
# One image for every dtx service and the operator:
#
#   dtx serve <coordinator|saga|payments|inventory|orders|notifications|gateway>
#   python -m dtx_operator           (the chart sets `command` for it)
#
# The chart (charts/dtx) runs it as uid 10001 with a read-only root filesystem and an
# emptyDir on /tmp; nothing here needs to write anywhere else.
#
# Base image: pinned by tag. To pin the digest too (recommended for releases), resolve it
# where a registry is reachable and pass it in, e.g.
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
# (Renovate/Dependabot keep such a digest current.) Both stages must use the same base:
# the venv's interpreter is a symlink to the base image's /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the virtualenv, from uv.lock only ----------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# uv from PyPI, pinned (the version the lock file was written with).
ARG UV_VERSION=0.13.8
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

ENV UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/dtx/venv

# The project sits where the runtime image has it, so compiled files and tracebacks name
# /app/... paths.
WORKDIR /app

# Dependencies first (a layer that changes only with the lock file) ...
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable

# ... then the project itself, installed as a wheel (no editable path into the sources).
COPY services/ services/
COPY operator/ operator/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
 && /opt/dtx/venv/bin/python -m compileall -q -j 0 services operator

# --- runtime: the venv and the sources, nothing else ---------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="dtx" \
      org.opencontainers.image.description="dtx services (2PC coordinator, saga, participants, gateway, notifications) and operator" \
      org.opencontainers.image.licenses="Apache-2.0"

# No compiler, no pip, no package lists: the slim base (less the system pip, setuptools and
# wheel: the venv runs without them) plus an unprivileged user.
RUN groupadd --system --gid 10001 dtx \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin dtx \
 && python -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel \
 && rm -rf /var/lib/apt/lists/* /root/.cache

COPY --from=build /opt/dtx/venv /opt/dtx/venv
# The sources come first on sys.path (PYTHONPATH), ahead of the copy in the venv, so that
# `skaffold dev` can sync changed .py files into /app/services and /app/operator. They are
# owned by the service user for that sync only: the chart mounts the root filesystem
# read-only, so a running service cannot change its own code.
COPY --from=build --chown=10001:10001 /app/services /app/services
COPY --from=build --chown=10001:10001 /app/operator /app/operator

ENV PATH=/opt/dtx/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/dtx/venv \
    PYTHONPATH=/app/services:/app/operator \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DTX_BIND_HOST=0.0.0.0

WORKDIR /app
USER 10001:10001

# gRPC, the side port (/metrics /healthz /readyz /status), the gateway's REST port.
EXPOSE 50051 9464 8080

ENTRYPOINT ["dtx"]
CMD ["--help"]
