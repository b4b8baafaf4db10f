# Build a wheel in one stage, install it into a slim runtime as a non-root user in the next.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 imagegen
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER imagegen
WORKDIR /home/imagegen
ENV DATA_DIR=/home/imagegen/data PYTHONUNBUFFERED=1
# /metrics asks for `Authorization: Bearer <METRICS_TOKEN>` when it is set: docker run -e METRICS_TOKEN=… (empty: open).
ENV METRICS_TOKEN=""
VOLUME ["/home/imagegen/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["imagegen", "serve", "--host", "0.0.0.0", "--port", "8000"]
