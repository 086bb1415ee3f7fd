# tangquant serve in a container: the OpenAI-compatible server on an exported OpenVINO IR.
#
#   docker build -t tangquant .
#   docker run --rm -p 8000:8000 -v "$PWD/work/int4-gptq/openvino:/model:ro" \
#       -e TANGQUANT_API_KEY=secret tangquant
#
# The model is a volume at /model (read-only is enough: an IR from `tangquant export`); the server
# runs as an unprivileged user; GET /health answers the orchestrator's liveness and readiness probes.
# Server flags go after the image name (`docker run … tangquant --max-num-seqs 16`).
FROM python:3.11-slim

# torch from its CPU index (PyPI's Linux wheels are the CUDA build); constraints.txt is the set CI tests.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /opt/tangquant
COPY pyproject.toml setup.cfg README.md constraints.txt ./
COPY tangquant ./tangquant
# The light install: no llama.cpp, no test tools.
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 10001 --user-group tangquant

USER 10001:10001
VOLUME ["/model"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tangquant", "serve", "--model", "/model", "--host", "0.0.0.0", "--allow-public", "--port", "8000"]
