#!/bin/sh
# Entrypoint of the GPU image (docker/gpu/Dockerfile).
#
#   engine BUILD_DIR [VERIFY_ARGS...]
#       1. runs the bundle's build script: python3 BUILD_DIR/$QP_BUNDLE_DIR/$QP_BUILD_SCRIPT --config BUILD_DIR/$QP_BUNDLE_DIR/$QP_BUILD_CONFIG
#       2. then: pipeline verify BUILD_DIR [VERIFY_ARGS...]   (its exit code is the container's: 4 = parity failed)
#   --help | -h        this text
#   anything else      passed to `pipeline` (for example: build --target trt --require-engine)
#
# The bundle contract this assumes (override the names with the environment variables):
#   QP_BUNDLE_DIR   folder inside BUILD_DIR holding the bundle            [default: trt]
#   QP_BUILD_SCRIPT Python script in it that takes `--config PATH`, builds
#                   the TensorRT engine and writes it into the bundle     [default: build_engine.py]
#   QP_BUILD_CONFIG its build configuration, passed as --config           [default: build_config.json]
# Exit codes: 2 = no such build directory or bundle, 5 = no NVIDIA GPU visible (run with --gpus all),
# otherwise the build script's (non-zero) or `pipeline verify`'s.
# The engine's own parity (Polygraphy TrtRunner against the FP32 graph) is run by
# `build --target trt --require-engine`, whose bundle stage builds and compares the engine.
set -eu

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

case "${1:-}" in
    engine) shift ;;
    "" | -h | --help) usage; exit 0 ;;
    *) exec pipeline "$@" ;;
esac

if [ "$#" -lt 1 ]; then
    echo "error: 'engine' needs BUILD_DIR (a pipeline build --target trt directory)" >&2
    exit 2
fi
build_dir=$1
shift
bundle="$build_dir/${QP_BUNDLE_DIR:-trt}"
script="$bundle/${QP_BUILD_SCRIPT:-build_engine.py}"
config="$bundle/${QP_BUILD_CONFIG:-build_config.json}"
for required in "$script" "$config"; do
    if [ ! -f "$required" ]; then
        echo "error: $required is missing: BUILD_DIR must be a 'pipeline build --target trt' directory whose parity passed" >&2
        exit 2
    fi
done
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU is visible in this container; run it with --gpus all on a GPU host" >&2
    exit 5
fi
python3 "$script" --config "$config"
exec pipeline verify "$build_dir" "$@"
