# The project's image for Kubernetes jobs (serving/kubernetes/): multi-worker training
# (python -m melanoma_tf.train) and batch scoring (python -m melanoma_tf.score).
# TF Serving itself runs the official tensorflow/serving image.
#   docker build -t melanoma-tf:0.1.0 .                                      # CPU
#   docker build --build-arg EXTRAS=[gpu] -t melanoma-tf:0.1.0-gpu .          # + CUDA libraries
# The tag matches setup.cfg's version and serving/kubernetes/kustomization.yaml.
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY melanoma_tf ./melanoma_tf
RUN pip install --no-cache-dir ".${EXTRAS}" && rm -rf /src
WORKDIR /work
