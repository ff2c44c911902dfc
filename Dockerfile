# The control-plane image: `hybridlb serve` (the Deployment) and `hybridlb bootstrap` (the
# Envoy pods' init container). Envoy itself runs from the envoyproxy/envoy image.
#
#   docker build -t hybridlb:0.1.0 .
#   kind load docker-image hybridlb:0.1.0      # or: docker push REGISTRY/hybridlb:0.1.0 and
#                                              # kustomize edit set image hybridlb=REGISTRY/...
#
# Pinned by version; pin by digest (python:3.11.13-slim-bookworm@sha256:...) for builds that
# must be reproducible.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xds_server ./xds_server
# Wheels of the package and of every dependency, so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/hybridlb/bin:$PATH
# The runtime only: no extras (the simulator, demo, benchmarks and their Envoy binary, rich
# and matplotlib are tools around the product, not part of it).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/hybridlb \
 && /opt/hybridlb/bin/pip install --no-cache-dir --no-index --find-links /wheels vllm-hybrid-lb \
 && groupadd --gid 10001 hybridlb \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin hybridlb
# Numeric, so that the kubelet can check runAsNonRoot.
USER 10001:10001
EXPOSE 18000 18080
ENTRYPOINT ["hybridlb"]
CMD ["serve", "--help"]
