# The project's image for Kubernetes jobs (serving/kubernetes/): multi-worker training
# (python -m melanoma_tf.train) and batch scoring (python -m melanoma_tf.score).
# TF Serving itself runs the official tensorflow/serving image.
#   docker build -t melanoma-tf:latest .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY melanoma_tf ./melanoma_tf
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /work
