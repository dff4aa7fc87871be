"""Flower record, metric and run-config keys (kebab-case), defined once."""

# Run config (pyproject [tool.flwr.app.config])
RUN_CONFIG_PATH = "config-path"
RUN_OUT_DIR = "out-dir"
#: Hydra overrides for a run started with ``flwr run .`` (used when ``config-path`` is empty).
RUN_OVERRIDES = "overrides"

# Server -> client (config-only message)
CONFIG_RECORD = "config"
SPEC = "spec"
#: Users already in the saved filter: their clients reply "skipped" instead of training.
REGISTERED_USERS = "registered-users"

# Client -> server (one upload)
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
USER_ID = "user-id"
CLASSES = "classes"
ERR_MEAN = "err-mean"
ERR_STD = "err-std"
#: Feature statistics: mean and std of the held-out log-likelihoods of the user's images.
LL_MEAN = "ll-mean"
LL_STD = "ll-std"
NUM_EXAMPLES = "num-examples"
TRAIN_SECONDS = "train-seconds"
RECEIVED_ARRAYS = "received-array-records"
DEVICE_CUDA = "device-cuda"
SKIPPED = "skipped"

# Node config (flower-supernode --node-config / simulation engine)
NODE_PARTITION_ID = "partition-id"
NODE_USER_ID = "user-id"
NODE_DATA_DIR = "data-dir"

#: Separator between the class label and the tensor name in the upload's ArrayRecord.
ARRAY_KEY_SEP = "/"
