# The web app on CPU, serving the embedded tiny Mixtral on port 7860:
#   docker build -t moe-offload . && docker run -p 7860:7860 moe-offload
# Another model: docker run -p 7860:7860 -v hf:/home/app/.cache/huggingface moe-offload \
#   python app.py --host 0.0.0.0 --model mistralai/Mixtral-8x7B-Instruct-v0.1 --expert-bits 2 --offload disk
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    DISABLE_CUDA=1

WORKDIR /app

# CPU torch first: requirements.txt asks for torch>=2.4 and pip keeps this build instead of
# fetching the multi-GB CUDA one.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Runtime packages only (pytest, ruff and playwright are for the tests). hqq ships as an sdist whose
# build would try to compile CUDA kernels; DISABLE_CUDA=1 above skips that (the app needs none).
COPY requirements.txt .
RUN grep -v -E '^(pytest|ruff|playwright)([^a-z_-]|$)' requirements.txt > /tmp/runtime.txt \
    && pip install -r /tmp/runtime.txt \
    && rm /tmp/runtime.txt

# Unprivileged user (uid 1000, as Hugging Face Spaces expects) owning the working folder, where the
# expert store (expert-store/) is written.
RUN useradd --create-home --uid 1000 app && chown app:app /app
COPY --chown=app:app . .
USER app

EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0"]
