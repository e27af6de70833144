# syntax=docker/dockerfile:1
# embedgate: slim by default (no torch: vendor models only); --build-arg
# WITH_LOCAL_MODEL=true adds the embedded all-MiniLM-L6-v2 model.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG WITH_LOCAL_MODEL=false
# torch goes in first and pinned so sentence-transformers keeps it, from PyTorch's CPU-only
# index (as scripts/setup does): TORCH_INDEX_URL= takes it from your usual index instead.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_ARGS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/embedgate
ENV PATH=/opt/embedgate/bin:$PATH
WORKDIR /src
COPY clients/python ./clients/python
COPY pyproject.toml README.md ./
COPY server ./server
# The server's distribution carries the client packages and the `embedgate` command.
RUN if [ "$WITH_LOCAL_MODEL" = "true" ]; then \
      pip install $PIP_EXTRA_ARGS ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "$TORCH_SPEC" && \
      pip install $PIP_EXTRA_ARGS ".[local]" && \
      python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; \
    else \
      pip install $PIP_EXTRA_ARGS .; \
    fi

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedgate
COPY --from=build /opt/embedgate /opt/embedgate
ENV PATH=/opt/embedgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["embedgate", "health", "--target", "127.0.0.1:50051", "--timeout", "4"]
ENTRYPOINT ["embedgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]
