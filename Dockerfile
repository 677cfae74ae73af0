# syntax=docker/dockerfile:1
# Two images from one file:
#
#   docker build --target train   -t mkd-tf:train .     # the `mkd` CLI on TensorFlow's GPU image
#   docker run --gpus all -v $PWD:/work -w /work mkd-tf:train train cache --out runs/mkd
#
#   mkd export runs/mkd --out saved_models/heart        # writes saved_models/heart/1 and saved_models/models.config
#   docker build --target serving -t mkd-tf:serving .   # TF Serving with every model in saved_models/
#   docker run -p 8500:8500 -p 8501:8501 mkd-tf:serving
#
# saved_models/ (the models and saved_models/models.config) is produced by `mkd export`; the folder itself
# is in the repo (with a README.md), so the build never fails, but run `mkd export` first: without
# models.config the server exits at start.

# --- train: the package and its CLI --------------------------------------------------------------
FROM tensorflow/tensorflow:2.21.0-gpu AS train
WORKDIR /opt/mkd-tf
# Packaging files first so the dependency layer is cached across source edits.
COPY setup.cfg pyproject.toml constraints.txt ./
COPY mkd_tf/ mkd_tf/
COPY cli/ cli/
# constraints.txt pins every dependency to the versions the tests ran with (TensorFlow is already
# in the base image at the same version, so pip keeps it).
RUN python3 -m pip install --no-cache-dir -c constraints.txt . \
    && mkd --help > /dev/null
WORKDIR /work
ENTRYPOINT ["mkd"]
CMD ["--help"]

# --- serving: TensorFlow Serving with the exported models ----------------------------------------
FROM tensorflow/serving:2.21.0 AS serving
# models.config (written by `mkd export`, base paths /models/NAME) lands in /models with the models.
COPY saved_models/ /models/
# The image's entrypoint starts tensorflow_model_server with gRPC on 8500 and REST on 8501 and
# appends these arguments; --model_config_file replaces its single-model MODEL_NAME mode. Version
# labels (`mkd export --label stable`) are accepted at start only with the last flag.
CMD ["--model_config_file=/models/models.config", "--model_config_file_poll_wait_seconds=60", \
     "--allow_version_labels_for_unavailable_models=true"]
