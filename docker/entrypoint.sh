#!/bin/sh
# The moeserve container's command: serve the model directory $MODEL_DIR (default /models, a volume).
# When it holds no config.json and DEMO_MODEL_IF_MISSING=1 (the image's default), the embedded demo checkpoint
# is written there first (with a .moeserve-demo marker) and, like `make serve`, a demo directory is served with
# configs/demo.yaml (as `moeserve-demo`). CONFIG_FILE names a YAML file of configuration keys instead; every key
# can also come from a MOESERVE_* variable. Arguments are passed on to `moeserve serve` (flags win).
# exec: moeserve replaces this shell, so SIGTERM (docker stop) drains requests and exits 0.
set -eu
model_dir=${MODEL_DIR:-/models}
if [ ! -f "$model_dir/config.json" ]; then
    if [ "${DEMO_MODEL_IF_MISSING:-0}" != 1 ]; then
        echo "entrypoint: no model in $model_dir (no config.json): mount a Hugging Face model directory there" >&2
        exit 2
    fi
    moeserve demo-model "$model_dir"
    touch "$model_dir/.moeserve-demo"
fi
config_file=${CONFIG_FILE:-}
if [ -z "$config_file" ] && [ -f "$model_dir/.moeserve-demo" ]; then
    config_file=configs/demo.yaml
fi
exec moeserve serve "$model_dir" ${config_file:+--config "$config_file"} "$@"
