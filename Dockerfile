# CUDA-capable image: PyPI's torch 2.14.1 wheels for Linux x86_64 carry their own CUDA runtime,
# so a plain Python base works on a GPU host (docker run --gpus all ...) and on CPU alike.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
RUN pip install -e . -e plugins/longtail-mm

COPY params.yaml dvc.yaml .dvcignore dvc_plots_template.html ./
COPY .dvc/config ./.dvc/config
# no git inside the image: DVC runs the pipeline without an SCM
RUN dvc config core.no_scm true && dvc config core.analytics false

# the paper protocol (CIFAR-10-LT r=100); mount data at /app/data/raw or let torchvision download it.
# `docker run IMAGE longtail demo --workspace` runs the embedded-data demo instead.
CMD ["dvc", "repro"]
