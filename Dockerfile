# syntax=docker/dockerfile:1
# One image, both services: `state-service` (the default command) and
# `agent-service`; the Kubernetes manifests in k8s/ choose one per container.
#
#   docker build -t statecar:0.2.0 .
#
# The build stage installs the project (with its committed protobuf code) into a
# virtualenv; the final stage copies only that virtualenv onto the same slim
# base, so no compiler, pip cache or source tree ships. Both stages must use the
# same base image: the virtualenv links to its Python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/statecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY shared_runtime/ shared_runtime/
COPY state_service/ state_service/
COPY agent_service/ agent_service/
# A regular (not editable) install: the final stage needs no source tree. The
# `postgres` extra (asyncpg) lets the image run the optional durable tier; it is
# imported only when STATE_SERVICE_POSTGRES_URL is set.
RUN /opt/statecar/bin/pip install .[postgres] \
    && /opt/statecar/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="statecar" \
      org.opencontainers.image.description="statecar state service and agent service" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 statecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin statecar
COPY --from=build /opt/statecar /opt/statecar
# Bytecode was compiled at install time; the root filesystem is read-only at run time.
ENV PATH=/opt/statecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
# state service gRPC + metrics, agent service gRPC + metrics
EXPOSE 50051 9464 50061 9465
CMD ["state-service"]
