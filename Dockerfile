# tvserve container, first version: installs the project, builds the default archives and serves
# them. Inference listens on 0.0.0.0:8080 inside the container; management and metrics stay on
# loopback. (A slim multi-stage image with token auth and a READY health check comes later.)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tvserve
COPY pyproject.toml ./
COPY tvserve tvserve
COPY handlers handlers
COPY training training
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

COPY config.properties ./
RUN sed -i 's|^inference_address=.*|inference_address=http://0.0.0.0:8080|' config.properties \
 && mkdir -p model_store \
 && /opt/venv/bin/tvserve prepare

EXPOSE 8080
CMD ["/opt/venv/bin/tvserve", "serve"]
