# tvserve container: TorchServe 0.12 in the foreground with the production configuration.
# Build: `make image` (buildah, also where no base image can be pulled) or `docker build -t tvserve .`
# Run:   docker run -p 8080:8080 -v tvserve-state:/var/lib/tvserve tvserve   (docs/deploying.md, "Container")
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: the project in a virtual environment, and the default archives ----
FROM ${BASE_IMAGE} AS build
# Wheels from PyPI plus PyTorch's CPU-only index (+cpu wheels win over PyPI's CUDA ones: GBs
# smaller). Where that index is not reachable, point these at a local mirror (make image does).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# The image's CA store (a build behind a TLS-inspecting proxy mounts its own bundle here).
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/tvserve
COPY pyproject.toml ./
COPY tvserve tvserve
COPY handlers handlers
COPY training training
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-compile .
# The /v2 and /v1 routes' TorchServe plugin, compiled here into the installed package (-P: not the
# source tree in this WORKDIR), so that the runtime needs only a JRE.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 && apt-get update && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
 && /opt/venv/bin/python -P -m tvserve.ops.plugin && rm -rf /var/lib/apt/lists/*
# Archives in the context's model_store/ are taken as they are; the missing defaults are built
# (digits_net is trained here, about 20 s; resnet18 when its weights can be downloaded).
COPY model_store model_store
RUN /opt/venv/bin/tvserve prepare --model-store model_store --runs /tmp/runs && rm -rf /tmp/runs

# ---- runtime: Python, a Java 17 runtime, FFmpeg's libraries (torchcodec decodes clips with them),
# the environment and the archives; nothing else ----
FROM ${BASE_IMAGE}
# Debian's bookworm versions move with security updates: pinning them would break the build.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    libavcodec59 libavformat59 libavutil57 libavdevice59 libavfilter8 libswscale6 libswresample4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /var/lib/tvserve --shell /usr/sbin/nologin tvserve \
 && install -d -o tvserve -g tvserve -m 0700 /var/lib/tvserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvserve/model_store /opt/tvserve/model_store
COPY tvserve/ops/config.production.properties scripts/container/entrypoint.sh /opt/tvserve/
WORKDIR /opt/tvserve
# TVSERVE_WORKDIR holds the API keys (key_file.json, 0600), logs and temporary files.
ENV PATH=/opt/venv/bin:$PATH TVSERVE_WORKDIR=/var/lib/tvserve PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
VOLUME /var/lib/tvserve
EXPOSE 8080 8079
# Healthy only when every model's workers are READY (/ping says Healthy while a worker crash-loops).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
  CMD ["tvserve", "health", "--workdir", "/var/lib/tvserve"]
# tini reaps orphans and forwards SIGTERM; tvserve then drains accepted requests and stops
# TorchServe (exit 0). A model that fails, or a server that dies, ends the container (exit 1).
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/tvserve/entrypoint.sh"]
