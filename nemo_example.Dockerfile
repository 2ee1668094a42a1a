# syntax=docker/dockerfile:1
# The GPU image for the NeMo path (clm/nemo): NVIDIA's NeMo Framework container 26.02, which
# ships Megatron-Bridge 0.3.0 (the version clm/nemo/recipe.py targets and MLCommons' current MoE
# reference pins), Megatron-core 0.16, Transformer Engine 2.12, PyTorch 2.10 and CUDA 13.0, plus
# this package. Build it from the repository root:
#   docker build -t <registry_path_image_name>:<image_tag> -f nemo_example.Dockerfile .
FROM nvcr.io/nvidia/nemo:26.02

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HYDRA_FULL_ERROR=1

WORKDIR /workspace/mlperf-moe

# Only what the image lacks: the MLPerf logger, and mistral-common for the Mistral v1
# tokenizer.model it ships (imported only to locate that file, so without its dependencies).
RUN pip install --no-cache-dir --no-deps mlperf-logging==4.1.68 mistral-common==1.13.1

# The package itself, without its pinned CPU stack: torch, hydra-core, omegaconf, sentencepiece,
# numpy and fsspec come from the image (--no-deps), built with its setuptools (no isolation).
COPY pyproject.toml README.md ./
COPY clm ./clm
COPY scripts ./scripts
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import megatron.bridge, clm.nemo.launch, clm.tokenizer as t; t.load_tokenizer(None, t.MISTRAL_V1_SHA256)"

ARG REVISION=unknown
LABEL org.opencontainers.image.title="mlperf-moe-nemo" \
      org.opencontainers.image.description="MLPerf Training MoE (Mixtral-8x22B) with Megatron-Bridge 0.3.0 (NeMo Framework 26.02)" \
      org.opencontainers.image.revision="${REVISION}"

# one process per GPU: torchrun (helm-context/) or srun (scripts/gpu/run.sub) start this
CMD ["python", "-m", "clm.nemo.launch", "--help"]
