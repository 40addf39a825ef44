# CUDA-capable image: PyPI's torch 2.14.1 wheels for Linux x86_64 carry their own CUDA runtime,
# so a plain Python base works on a GPU host (docker run --gpus all ...) and on CPU alike.
#
# The image holds the installed code only. The workspace (a clone of the repository: params.yaml,
# dvc.yaml, data/, and everything the pipeline writes) is the host folder mounted at /workspace:
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD":/workspace longtail [longtail demo]
FROM python:3.11-slim

# git: DVC experiments (`longtail demo`, `dvc exp run`) need the workspace's git repository;
# gcc + libc headers: torch.compile's Triton backend builds a small C launcher on GPU hosts
# (without a compiler it falls back to eager with a warning).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# USER: a host uid the image's /etc/passwd lacks (`docker run --user "$(id -u):$(id -g)"`) has no user
# name otherwise, and DVC asks for one (its site cache; the git identity of an experiment's commit).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    HOME=/home/longtail \
    USER=longtail

WORKDIR /opt/longtail
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins/longtail-mm ./plugins/longtail-mm
RUN pip install . ./plugins/longtail-mm

# a non-root user; `docker run --user "$(id -u):$(id -g)"` runs as the host user instead, so the files
# written into the mounted workspace belong to them. HOME (caches, git config) is writable by any uid,
# and git accepts a workspace owned by another uid.
RUN useradd --create-home --uid 1000 longtail \
    && chmod 1777 /home/longtail \
    && git config --system --add safe.directory '*'
USER 1000
WORKDIR /workspace

# the paper protocol (CIFAR-10-LT r=100) on the mounted workspace; `longtail demo` runs the demo
CMD ["dvc", "repro"]
