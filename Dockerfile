# yeastar-archiver as a container: non-root, an init as PID 1, a HEALTHCHECK, volumes for the
# archive and the ledger, the secret from /run/secrets. See docker-compose.example.yml.

# ---- build: a venv with the archiver and its init, nothing else
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE yeastar_archiver.py ./
COPY daemon ./daemon
# dumb-init is PID 1: it forwards SIGTERM to the archiver and reaps; its wheel carries the binary,
# so no package manager is needed in either stage.
RUN python -m venv /opt/yeastar-archiver \
 && /opt/yeastar-archiver/bin/pip install --no-cache-dir . dumb-init==1.2.5.post1

# ---- runtime
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/yeastar-archiver/bin:$PATH \
    YEASTAR_ARCHIVER_CONFIG=/etc/yeastar-archiver/config.yaml
COPY --from=build /opt/yeastar-archiver /opt/yeastar-archiver
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/yeastar-archiver \
        --shell /usr/sbin/nologin yeastar-archiver \
 && mkdir -p /srv/recordings /var/lib/yeastar-archiver /etc/yeastar-archiver \
 && chown yeastar-archiver:yeastar-archiver /srv/recordings /var/lib/yeastar-archiver
USER 10001:10001
WORKDIR /var/lib/yeastar-archiver
VOLUME ["/srv/recordings", "/var/lib/yeastar-archiver"]
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["yeastar-archiver", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["dumb-init", "--", "yeastar-archiver"]
CMD ["run"]
