# dcs-migration-exporter container image.
#
#   docker build -t dcs-migration-exporter:0.1.0 .
#   docker run -d -p 9713:9713 -v $PWD/config.yaml:/etc/dcs-migration-exporter/config.yaml:ro \
#     --read-only --user 65532:65532 dcs-migration-exporter:0.1.0
#   docker run -d -p 9713:9713 dcs-migration-exporter:0.1.0 --demo     # no cloud account needed
#
# Stage 1 builds the package and its dependencies into a virtualenv; stage 2 copies only that
# virtualenv, so no source tree, compiler or pip cache reaches the runtime image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/dcs-migration-exporter
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# Installs the package (not editable) and its pinned-by-pyproject dependencies, then compiles
# bytecode so the read-only runtime never needs to write .pyc files.
RUN /opt/dcs-migration-exporter/bin/pip install . \
    && /opt/dcs-migration-exporter/bin/python -m compileall -q /opt/dcs-migration-exporter

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dcs-migration-exporter" \
      org.opencontainers.image.description="Prometheus exporter for DCS (managed Redis) online migration tasks" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/dcs-migration-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/dcs-migration-exporter /opt/dcs-migration-exporter
# The config is mounted here (a ConfigMap in the Helm chart); secrets go to secrets/ as files.
WORKDIR /etc/dcs-migration-exporter
# Numeric non-root user and group (the "nonroot" 65532 convention): no /etc/passwd entry needed,
# and Kubernetes can verify runAsNonRoot.
USER 65532:65532
EXPOSE 9713
# slim has no curl: probe /healthz with the image's own Python (exits 1 on 503 or no answer).
# Moved the listen port? Set DCS_EXPORTER_HEALTHCHECK_URL to match (docker run -e ...).
ENV DCS_EXPORTER_HEALTHCHECK_URL=http://127.0.0.1:9713/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(os.environ['DCS_EXPORTER_HEALTHCHECK_URL'], timeout=4).status != 200)"]
ENTRYPOINT ["dcs-migration-exporter"]
CMD ["--config.file=/etc/dcs-migration-exporter/config.yaml"]
