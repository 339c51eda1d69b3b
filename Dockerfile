# Training image: CUDA PyTorch (the PyPI wheels bundle the CUDA 13 runtime, so the host needs
# only an NVIDIA driver >= 580 and the NVIDIA container toolkit) + this project, non-root.
#   docker build -t pipeline --build-arg GIT_SHA=$(git rev-parse HEAD) .
#   mkdir -p runs   # else Docker creates it root-owned; or run as yourself: --user "$(id -u):$(id -g)"
#   docker run --rm --gpus all --shm-size=16g -e WANDB_API_KEY \
#     -v "$PWD/data:/data:ro" -v pipeline-cache:/cache -v "$PWD/runs:/runs" pipeline \
#     launch/train.py data.root=/data data.cache_dir=/cache output_dir=/runs recipe=NAME
#   docker stop -t 300 ...   # the grace period for the checkpoint saved on SIGTERM (exit 143)
# Without arguments it runs the CMD below: the config defaults on the mounted volumes.
# The W&B key is never baked in: pass it at run time (-e WANDB_API_KEY); without it runs are offline.
# No registry reachable? Build from a local image with the same layout: --build-arg BASE_IMAGE=NAME.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch.compile needs a C/C++ compiler: inductor builds C++ kernels on CPU, Triton builds its
# launcher with a C compiler on GPUs. The slim image has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Same install lines as the README quickstart. torch first, in its own layer, so that a code
# change does not download it again.
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY . .
RUN pip install .

# Kubernetes and OpenShift run images under any uid, in group 0: HOME, every cache and the
# working directory belong to group 0 with the owner's rights. These folders are also sticky and
# world-writable, like /tmp, for `--user "$(id -u):$(id -g)"` with a host group.
ENV HOME=/home/app
ENV XDG_CACHE_HOME=$HOME/.cache \
    XDG_CONFIG_HOME=$HOME/.config \
    XDG_DATA_HOME=$HOME/.local/share
ENV MPLCONFIGDIR=$XDG_CONFIG_HOME/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=$XDG_CACHE_HOME/torchinductor \
    TRITON_CACHE_DIR=$XDG_CACHE_HOME/triton \
    HF_HOME=$XDG_CACHE_HOME/huggingface \
    WANDB_DATA_DIR=$XDG_DATA_HOME/wandb \
    WANDB_CACHE_DIR=$XDG_CACHE_HOME/wandb \
    WANDB_CONFIG_DIR=$XDG_CONFIG_HOME/wandb \
    WANDB_DIR=/runs
# uid 1000 written numerically in USER so Kubernetes' runAsNonRoot can check it.
RUN useradd --uid 1000 --gid 0 --home-dir "$HOME" --no-create-home app \
    && mkdir -p "$HOME" /data /cache /runs \
    && chown -R 1000:0 /app "$HOME" /data /cache /runs \
    && chmod -R g=u /app "$HOME" /data /cache /runs \
    && chmod 1777 /app "$HOME" /cache /runs
USER 1000

# .git is not in the build context: the commit comes as a build argument, and each run records it in run.json.
# Declared after the install layers, so a new commit does not rebuild them.
ARG GIT_SHA=""
ENV PIPELINE_GIT_SHA=$GIT_SHA

# Raw data (read-only is fine), Arrow shard cache, run outputs (weights, summary, W&B files).
VOLUME ["/data", "/cache", "/runs"]

# `docker run IMAGE ARGS` = `accelerate launch ARGS`, through launch/run.py: as PID 1 it passes
# SIGTERM on to the training (which saves a checkpoint and exits 143) and exits with the
# training's own code. No config file, so accelerate starts one process per visible GPU (pass
# e.g. --config_file launch/accelerate/bf16.yaml before the script). Overrides given in
# `docker run` replace this CMD, so repeat the three paths there.
ENTRYPOINT ["python", "launch/run.py"]
CMD ["launch/train.py", "data.root=/data", "data.cache_dir=/cache", "output_dir=/runs"]
