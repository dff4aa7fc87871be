"""Flower record, metric and run-config keys (kebab-case), defined once."""

# Run config (pyproject [tool.flwr.app.config])
RUN_CONFIG_PATH = "config-path"
RUN_OUT_DIR = "out-dir"
#: Hydra overrides for a run started with ``flwr run .`` (used when ``config-path`` is empty).
RUN_OVERRIDES = "overrides"
#: Run-config key: at most this many messages waiting in the SuperLink at once (0: no limit);
#: set by ``docl-flower`` for simulations (see :class:`~.grids.StreamingGrid`).
RUN_SEND_WINDOW = "send-window"
#: Run-config key: SHA-256 of the ``config-path`` file whose training recipe ``docl-flower``
#: built already (the ServerApp then skips that 1-2 s check while the file is unchanged).
RUN_CONFIG_CHECKED = "config-checked"

# Server -> client (config-only message)
CONFIG_RECORD = "config"
SPEC = "spec"
#: Users already in the saved filter: their clients reply "skipped" instead of training.
REGISTERED_USERS = "registered-users"
#: The user the server bound the receiving node to (a simulation's nodes are the server's
#: own: it assigns them; a deployment's come from the operator's bindings).
ASSIGNED_USER = "assigned-user"

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
#: Differential privacy (``train.dp``), per user: the (epsilon, delta) its upload spent and the
#: DP-SGD noise multiplier. All three or none (a client without DP sends none).
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_KEYS = (DP_EPSILON, DP_DELTA, DP_NOISE_MULTIPLIER)

# Node config (flower-supernode --node-config / simulation engine)
NODE_PARTITION_ID = "partition-id"
NODE_USER_ID = "user-id"
NODE_DATA_DIR = "data-dir"

#: Separator between the class label and the tensor name in the upload's ArrayRecord.
ARRAY_KEY_SEP = "/"

#: The ServerApp's last log line starts so: ``docl-flower`` streams a run until it comes.
RESULTS_LOGGED = "results written to"
