# yeastar-archiver as a container: non-root, an init as PID 1, a HEALTHCHECK, volumes for the
# archive and the ledger, the secret from /run/secrets. See docker-compose.example.yml.

# ---- build: a venv with the archiver and its init, nothing else
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Every third-party package comes from requirements.lock, pinned and hash-checked (`make lock`
# regenerates it): the image is the same whenever it is built. dumb-init is PID 1 (it forwards
# SIGTERM to the archiver and reaps); its wheel carries the binary, so no package manager is
# needed in either stage. setuptools builds the archiver below and is removed afterwards.
COPY requirements.lock ./
RUN python -m venv /opt/yeastar-archiver \
 && /opt/yeastar-archiver/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md LICENSE yeastar_archiver.py ./
COPY daemon ./daemon
# The archiver itself, from this source and nothing else: no index, no build isolation.
RUN /opt/yeastar-archiver/bin/pip install --no-cache-dir --no-index --no-deps --no-build-isolation . \
 && /opt/yeastar-archiver/bin/pip check \
 && /opt/yeastar-archiver/bin/pip uninstall --yes setuptools

# ---- runtime
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/yeastar-archiver/bin:$PATH \
    YEASTAR_ARCHIVER_CONFIG=/etc/yeastar-archiver/config.yaml
# service.listen defaults to 127.0.0.1, which inside a container answers nothing through the EXPOSEd
# port: listen on every interface here (an override, so a config file's own service.listen loses to
# it; `-e YEASTAR_ARCHIVER_SERVICE__LISTEN=...` changes it, `=null` turns the endpoint off).
ENV YEASTAR_ARCHIVER_SERVICE__LISTEN=0.0.0.0:9464
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
