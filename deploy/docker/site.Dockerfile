# syntax=docker/dockerfile:1
# A site's image: `xkt-client join` (federated rounds; dials out, nothing listens) and `xkt-client adapt`
# (single-site adaptation, run on a schedule). CPU only. Build from the repository root:
#
#   docker build -f deploy/docker/site.Dockerfile -t xkt-site:0.1.0 .
#
# Nothing secret is baked in: the site kit and the SuperNode key are mounted at run time under /etc/xkt,
# the signing key as a secret, the site's data read-only at /var/lib/xkt/site. The root filesystem may be
# read-only; the process writes only to the two volumes below and to /tmp (mount a tmpfs there).

# Python 3.11, pinned by version tag; see owner.Dockerfile for why no digest is stated and how to add one.
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

# ---- runtime: the venv and a fixed non-root user
FROM ${PYTHON_IMAGE}
# UID/GID 10001: fixed, so host directories and Kubernetes' runAsUser/fsGroup can be set to match.
RUN groupadd --system --gid 10001 xkt \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin xkt \
    && install -d -m 0755 /etc/xkt /etc/xkt/kit /var/lib/xkt /var/lib/xkt/site \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/xkt/out /var/lib/xkt/cache
COPY --from=build /opt/xkt /opt/xkt
# XKT_HOME makes `adapt` cache models in /var/lib/xkt/cache; HOME is the /tmp tmpfs: nothing writes to /.
ENV PATH=/opt/xkt/bin:$PATH \
    XKT_HOME=/var/lib/xkt \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/lib/xkt/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_HOME=/var/lib/xkt/cache/flwr \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/xkt
VOLUME ["/var/lib/xkt/out", "/var/lib/xkt/cache"]
# Nothing listens on a site, so there is nothing of its own to probe: deploy/compose.yaml gives the
# long-running `join` service a healthcheck that asks the owner's fleet proxy (xkt-server health --fleet).
HEALTHCHECK NONE
ENTRYPOINT ["xkt-client"]
CMD ["--help"]
