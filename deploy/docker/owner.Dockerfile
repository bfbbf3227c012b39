# syntax=docker/dockerfile:1
# The model owner's image: `xkt-server serve` (gRPC, port 8443) and `xkt-server federate` (a loopback
# SuperLink behind the fleet-only nginx proxy, port 9443). CPU only. Build from the repository root:
#
#   docker build -f deploy/docker/owner.Dockerfile -t xkt-owner:0.1.0 .
#
# Nothing secret is baked in: the PKI, the owner's public key, the site keys and the signed models are
# mounted at run time (deploy/compose.yaml, deploy/k8s/). The root filesystem may be read-only; the
# process writes only to the two volumes below and to /tmp (mount a tmpfs there).

# Python 3.11 (pyproject.toml's target), pinned by version tag. No digest is stated because no registry
# was reachable where this file was written, and a digest nobody checked is worse than none. Pin one
# where you build: `docker buildx imagetools inspect python:3.11.14-slim-bookworm`, then build with
# --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<that digest>.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: the virtual environment, made by the same script as `make install`
FROM ${PYTHON_IMAGE} AS build
# The CPU wheel index: torch comes from it alone, so pip can never pick a CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY shared shared
COPY server server
COPY client client
COPY protos protos
COPY benchmarks benchmarks
RUN ./deploy/install.sh python --venv /opt/xkt

# ---- runtime: the venv, nginx, a fixed non-root user, nothing else
FROM ${PYTHON_IMAGE}
COPY deploy/install.sh /usr/local/share/xkt/install.sh
RUN /usr/local/share/xkt/install.sh nginx --required \
    && rm -rf /var/lib/apt/lists/*
# UID/GID 10001: fixed, so host directories and Kubernetes' runAsUser/fsGroup can be set to match.
RUN groupadd --system --gid 10001 xkt \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin xkt \
    && install -d -m 0755 /srv/xkt /srv/xkt/pki /srv/xkt/keys /srv/xkt/models /srv/xkt/site-keys \
    && install -d -o 10001 -g 10001 -m 0700 /srv/xkt/audit /srv/xkt/federation
COPY --from=build /opt/xkt /opt/xkt
# HOME and the caches live on /tmp (a tmpfs), Flower's home on the federation volume: nothing writes to /.
ENV PATH=/opt/xkt/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_HOME=/srv/xkt/federation/flwr \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /srv/xkt
VOLUME ["/srv/xkt/audit", "/srv/xkt/federation"]
EXPOSE 8443 9443
# `xkt-server health`: grpc.health.v1 over the real mutual TLS, with the probe's own kit (`xkt-server
# provision add-site owner-probe`; the handshake needs a client certificate even for health). Run as
# `python -m xkt.server.commands.health`, which skips importing torch: a tenth of the CPU and memory.
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
    CMD ["python", "-m", "xkt.server.commands.health", "--address", "127.0.0.1:8443", "--kit", "/srv/xkt/pki/sites/owner-probe", "--quiet"]
ENTRYPOINT ["xkt-server"]
CMD ["serve", "--model", "/srv/xkt/models/current", "--owner-key", "/srv/xkt/keys/owner.pub", \
     "--listen", "0.0.0.0:8443", "--tls-cert", "/srv/xkt/pki/server.crt", "--tls-key", "/srv/xkt/pki/server.key", \
     "--client-ca", "/srv/xkt/pki/ca.crt", "--pki", "/srv/xkt/pki", "--audit-log", "/srv/xkt/audit/audit.log"]
