# csr-service container image.
#
#   docker build -t csr-service:0.1.0 .
#
# Stage 1 builds wheels for csr-service and all its dependencies with `pip wheel`, exactly as the
# tests do (tests/helm/test_dockerfile.py runs this install step outside Docker). Every
# dependency ships manylinux wheels; csr-service's own wheel compiles one small C extension (the
# HPACK decoder, csr_service/transport/_hpack.c), so this stage installs a C compiler. The final
# stage gets only the wheels, installs them offline and drops pip: no compiler there.
#
# Build arguments (`make image` sets them from git; docs/install.md, "Building the image"):
#   PYTHON_IMAGE  the base (the test bed builds a local stand-in where no registry is reachable)
#   VERSION       the distribution version in pyproject.toml (the wheel installed, the label)
#   REVISION      the git commit; `csr-service --version` and the OCI label report it
#   SOURCE        the repository URL for the OCI label
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# The C compiler for the extension, and Python's headers where the base lacks them (the official
# image has them; a base on Debian's own python3 needs python3-dev). Versions are the base's
# suite's, whatever its point release: the compiler does not reach the final image.
# hadolint ignore=DL3008,SC2086
RUN include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    && packages="gcc libc6-dev" \
    && { [ -e "${include}/Python.h" ] || packages="${packages} python3-dev"; } \
    && apt-get update \
    && apt-get install --yes --no-install-recommends ${packages} \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
# The dependencies first, from pyproject.toml and setup.py alone (empty packages stand in for
# ours, without the extension's source: setup.py's extension is optional): this layer is reused
# until either changes, so a source change or a new commit does not download them again. The
# vault extra (hvac) is included: one image serves every issuer.
RUN mkdir csr_service issuers \
    && touch csr_service/__init__.py issuers/__init__.py \
    && pip wheel --wheel-dir /wheels ".[vault]" \
    && rm -rf /wheels/csr_service-* csr_service issuers build ./*.egg-info
COPY csr_service ./csr_service
# The built-in issuer plugins (registered as entry points in pyproject.toml).
COPY issuers ./issuers
ARG REVISION=unknown
# The commit goes into the wheel itself (package data), so `--version` reports what was built.
# The extension is optional to setuptools (a checkout installs without a compiler); here it must
# be built, so the wheel is checked for it.
RUN printf '%s\n' "${REVISION}" > csr_service/BUILD_REVISION \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; [wheel] = glob.glob('/wheels/csr_service-*.whl'); \
sys.exit(not any(n.startswith('csr_service/transport/_hpack.') for n in zipfile.ZipFile(wheel).namelist()))"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/csr-service/csr-service
LABEL org.opencontainers.image.title="csr-service" \
      org.opencontainers.image.description="An external certificate authority for Istio (istio.v1.auth.IstioCertificateService) with cert-manager, Vault/OpenBao and local CA issuers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.documentation="https://github.com/csr-service/csr-service/blob/main/docs/install.md"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 csr \
    && useradd --system --uid 10001 --gid csr --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin csr
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels "csr-service[vault]==${VERSION}" \
    && rm -rf /tmp/wheels \
    && pip uninstall --yes pip setuptools wheel
USER 10001:10001
# 6443: gRPC (TLS), Istio's caAddress via the Service's port 443. 9402: /livez, /readyz, /metrics.
EXPOSE 6443 9402
ENTRYPOINT ["csr-service", "serve"]
