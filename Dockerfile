# tvserve container (first version; building and running it is tested in its own issue).
# Installs the project, builds the default archives, and serves them with the production
# configuration: inference on 0.0.0.0:8080 with token authorization, management and metrics on
# loopback inside the container, no model registration API. Keys: /opt/tvserve/.tvserve/key_file.json.
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

COPY config.properties config.production.properties ./
RUN mkdir -p model_store && /opt/venv/bin/tvserve prepare \
 && useradd --system --home-dir /opt/tvserve tvserve && chown -R tvserve /opt/tvserve
USER tvserve

EXPOSE 8080
# Healthy only when every model's workers are READY (/ping says Healthy while a worker crash-loops).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s CMD ["/opt/venv/bin/tvserve", "health"]
# The server in the foreground: SIGTERM drains accepted requests, then stops; a crash ends the container.
CMD ["/opt/venv/bin/tvserve", "serve", "--production"]
