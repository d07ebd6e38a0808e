# Hosted Space image (Docker Space, CPU): serves the app on port 7860, read-only by default.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKVIZ_READONLY=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

RUN useradd -m -u 1000 user
WORKDIR /home/user/app

# CPU torch from PyTorch's CPU index keeps the image small (no CUDA wheels).
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch && \
    pip install -r requirements.txt

COPY --chown=user . .
USER user
EXPOSE 7860
CMD ["python", "app.py"]
