# sso-gateway: one replica. Build: docker build -t sso-gateway .
# Keys, secrets and IdP metadata are mounted at run time, never baked into the image.

# lxml and xmlsec must link the same libxml2, so both are built from source here
# (mixing their binary wheels fails at import with "lxml & xmlsec libxml2 library version mismatch").
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config \
      libxml2-dev libxmlsec1-dev libxmlsec1-openssl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels --no-binary lxml,xmlsec .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 GATEWAY_CONFIG=/etc/sso-gateway/gateway.toml
RUN apt-get update \
 && apt-get install -y --no-install-recommends libxml2 libxmlsec1 libxmlsec1-openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
 && mkdir /data && chown gateway /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels sso-gateway \
 && rm -rf /wheels
USER gateway
WORKDIR /data
EXPOSE 8000
# Liveness only (slim has no curl): /readyz, which also pings the store, is for balancers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["sso-gateway", "serve"]
