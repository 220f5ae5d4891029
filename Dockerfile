# csr-service container image.
#
#   docker build -t csr-service:0.1.0 .
#
# Stage 1 builds wheels for csr-service and all its dependencies with `pip wheel`, exactly as the
# tests do (tests/helm/test_dockerfile.py runs this install step outside Docker). Every
# dependency ships manylinux wheels, so no compiler is needed even here; the final stage gets
# only the wheels, installs them offline and drops pip.
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
COPY pyproject.toml README.md ./
# The dependencies first, from pyproject.toml alone (empty packages stand in for ours): this
# layer is reused until pyproject.toml changes, so a source change or a new commit does not
# download them again. The vault extra (hvac) is included: one image serves every issuer.
RUN mkdir csr_service issuers \
    && touch csr_service/__init__.py issuers/__init__.py \
    && pip wheel --wheel-dir /wheels ".[vault]" \
    && rm -rf /wheels/csr_service-* csr_service issuers build ./*.egg-info
COPY csr_service ./csr_service
# The built-in issuer plugins (registered as entry points in pyproject.toml).
COPY issuers ./issuers
ARG REVISION=unknown
# The commit goes into the wheel itself (package data), so `--version` reports what was built.
RUN printf '%s\n' "${REVISION}" > csr_service/BUILD_REVISION \
    && pip wheel --no-deps --wheel-dir /wheels .

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
