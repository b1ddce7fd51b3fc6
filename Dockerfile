# cdpflow image for docker-compose: the collector and the worker share it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY sources sources
COPY sinks sinks
COPY schemas schemas
RUN pip install --no-cache-dir .
ENV CDP_COLLECTOR_HOST=0.0.0.0 CDP_WORKER_DATA_DIR=/data
ENTRYPOINT ["cdpflow"]
