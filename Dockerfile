# cnai, CPU image: `cnai serve` (Immich's ML endpoint on :3003 + the queue listener).
#
# Offline (no image registry, pip in the build can't reach or trust an index): scripts/build-images makes the base
# image with mmdebstrap + `docker import` and builds the Python wheels on the host into .cache/wheelhouse, which
# this build then installs with no index. Where a registry and PyPI are reachable, no wheelhouse is needed:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t cnai .
# Any base works that has Python >= 3.11 with its venv module (Debian: python3 python3-venv).
ARG BASE_IMAGE=cnai-base:bookworm

FROM ${BASE_IMAGE} AS build
ENV PATH=/opt/cnai/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/cnai
# Dependencies first, in their own layer: a source change doesn't reinstall them. The wheel pattern may match
# nothing (no wheelhouse): then pip uses its index.
COPY pyproject.toml docker/requirements.py .cache/wheelhouse/*.whl /deps/
RUN if ls /deps/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /deps; fi \
 && python3 /deps/requirements.py /deps/pyproject.toml > /deps/requirements.txt \
 && pip install "$@" -r /deps/requirements.txt
COPY . /src
RUN pip install --no-deps --no-build-isolation /src \
 && pip uninstall -y setuptools pip

FROM ${BASE_IMAGE}
ARG UID=1000
RUN useradd --uid "${UID}" --user-group --create-home --shell /usr/sbin/nologin cnai \
 && mkdir -p /models /mnt/immich \
 && chown cnai:cnai /models
COPY --from=build /opt/cnai /opt/cnai
ENV PATH=/opt/cnai/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CNAI_MODELS_DIR=/models \
    CNAI_PORT=3003
# Models (cn-clip, InsightFace packs) live in a volume; RapidOCR's models come with its wheel.
VOLUME /models
USER cnai
# 3003: Immich ML (and /metrics, /status); 8060: MT Photos' AI API, only when CNAI_MTPHOTOS_API_KEY is set
EXPOSE 3003 8060
# Immich pings /ping every 30 s with a 2 s timeout; model loading at start can take a while.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('CNAI_PORT', '3003'), timeout=4).read() != b'pong')"]
ENTRYPOINT ["cnai"]
CMD ["serve"]
