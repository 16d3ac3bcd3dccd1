# syntax=docker/dockerfile:1
# dsv4-serve: OpenAI/DeepSeek-compatible server for DeepSeek-V4 models.
#
#   docker build -t dsv4-serve .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -e DSV4_API_KEY="$(openssl rand -hex 24)" \
#       -v /path/to/DeepSeek-V4-Flash:/models/model:ro dsv4-serve
#
# No open endpoint by default: the container listens on 0.0.0.0 (to be reachable through the
# published port), so `dsv4 serve` refuses to start unless DSV4_API_KEY is set (clients send
# `Authorization: Bearer $DSV4_API_KEY`). Behind your own authenticating proxy, append
# `--allow-no-api-key` to the arguments instead. Publish the port on 127.0.0.1 as above unless
# other hosts should reach it.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- build: a virtual environment with torch and the package ------------------------------------
FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer: it is most of the image and changes least often.
# The Linux wheels on PyPI bundle their CUDA libraries; override the index for another CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY kernels ./kernels
COPY bench/__init__.py bench/bench_serve.py ./bench/
RUN pip install .

# ---- runtime: CUDA runtime + python + the venv, as a non-root user ------------------------------
FROM ${CUDA_IMAGE}
# gcc and the Python headers: Triton compiles a small C launcher the first time a kernel runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
# uid 1000 is taken by the image's `ubuntu` user.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin dsv4 \
    && mkdir -p /models && chown dsv4:dsv4 /models
USER dsv4
WORKDIR /home/dsv4

EXPOSE 8000
# Loading weights takes minutes, hence the long start period. Assumes the default port 8000.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["dsv4", "serve"]
CMD ["--model", "/models/model", "--host", "0.0.0.0", "--port", "8000"]
