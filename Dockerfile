# tokenwire's image: the server, the bridge and the CLI (`tokenwire ...`), serving models from a
# model store on a volume at /models. It has no torch: models are built by `tokenwire pull` with
# the `export` extra, elsewhere or in the builder variant below, into that volume.
#
#   docker build -t tokenwire:0.1.0 .
#   docker run -v tokenwire-models:/models -p 50051:50051 -e TOKENWIRE_INSECURE_OPEN=true tokenwire:0.1.0
#
# The default command serves every address of the container (--host 0.0.0.0), which tokenwire
# refuses without API keys in its database: create one first (`tokenwire keys create NAME`, on
# the same database), or say that the network in front is the gate (TOKENWIRE_INSECURE_OPEN=true;
# in Kubernetes a Secret gives it, see deploy/kubernetes/secrets.yaml and docs/deploy.md).
#
# The builder variant, for a Job that fills the model store (deploy/kubernetes/pull-models-job.yaml):
#   docker build --build-arg EXTRAS=postgres,voice,vision,export -t tokenwire-builder:0.1.0 .
# (add --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for torch's CPU wheels)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# postgres: the chats in PostgreSQL (psycopg2); voice and vision: speech to text and the text of
# images (their models come from the store like any other); add export to build models too.
ARG EXTRAS=postgres,voice,vision
# pip reads it from the environment when given (torch's CPU wheels for the builder variant).
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# A C compiler only here: the native kernels are compiled once, below, into the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY . .
RUN pip install ".[${EXTRAS}]"
# server/native/loader.py compiles the kernels on first use into a cache keyed by the sources'
# hash; the runtime image has no compiler, so build that cache now (the kernels choose AVX-512 or
# AVX2 at run time, so the build machine's CPU does not matter). Where they cannot be compiled
# (another architecture) the server uses onnxruntime's kernels instead, as on any such machine.
ENV TOKENWIRE_NATIVE_CACHE=/opt/tokenwire/native
RUN mkdir -p "$TOKENWIRE_NATIVE_CACHE" \
 && python -c "from tokenwire.server.native import loader; lib = loader.library(); print('native kernels:', lib.path or lib.reason)"

FROM ${PYTHON_IMAGE}
# A numeric non-root user, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 tokenwire \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tokenwire --create-home \
            --shell /usr/sbin/nologin tokenwire \
 && mkdir -p /models /data \
 && chown tokenwire:tokenwire /models /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tokenwire /opt/tokenwire
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENWIRE_MODELS=/models \
    TOKENWIRE_NATIVE_CACHE=/opt/tokenwire/native \
    TOKENWIRE_DATABASE=/data/tokenwire.db
USER 10001:10001
WORKDIR /home/tokenwire
# gRPC, the server's metrics and /readyz, the bridge's HTTP
EXPOSE 50051 9464 8000
ENTRYPOINT ["tokenwire"]
# The metrics listener on a non-loopback address needs the host names it answers: any ('*'),
# since a router or Prometheus reaches it by pod address (protect /metrics with --metrics-token).
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--allowed-hosts", "*"]
