# Training image: CUDA PyTorch (the PyPI wheels bundle the CUDA 13 runtime, so the host needs
# only an NVIDIA driver >= 580 and the NVIDIA container toolkit) + this project, non-root.
#   docker build -t pipeline --build-arg GIT_SHA=$(git rev-parse HEAD) .
#   docker run --rm --gpus all --shm-size=16g -e WANDB_API_KEY \
#     -v "$PWD/data:/data:ro" -v pipeline-cache:/cache -v "$PWD/runs:/runs" pipeline \
#     launch/train.py data.root=/data data.cache_dir=/cache output_dir=/runs recipe=NAME
# Without arguments it runs the CMD below: the config defaults on the mounted volumes.
# The W&B key is never baked in: pass it at run time (-e WANDB_API_KEY); without it runs are offline.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Same install lines as the README quickstart. torch first, in its own layer, so that a code
# change does not download it again.
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY . .
RUN pip install .

# .git is not in the build context: the commit comes as a build argument, and each run records it in run.json.
# Declared after the install layers, so a new commit does not rebuild them.
ARG GIT_SHA=""
ENV PIPELINE_GIT_SHA=$GIT_SHA

# uid 1000 written numerically in USER so Kubernetes' runAsNonRoot can check it. /app is
# writable because the trainer and wandb may write into the working directory.
RUN useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /data /cache /runs \
    && chown -R app:app /app /data /cache /runs
USER 1000:1000

# Raw data (read-only is fine), Arrow shard cache, run outputs (weights, summary, W&B files).
VOLUME ["/data", "/cache", "/runs"]

# `docker run IMAGE ARGS` = `accelerate launch ARGS`: no config file, so accelerate starts one
# process per visible GPU (pass e.g. --config_file launch/accelerate/bf16.yaml before the script).
# Overrides given in `docker run` replace this CMD, so repeat the three paths there.
ENTRYPOINT ["accelerate", "launch"]
CMD ["launch/train.py", "data.root=/data", "data.cache_dir=/cache", "output_dir=/runs"]
