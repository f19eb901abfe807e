#!/usr/bin/env bash
# Build the inference image, push it to ECR and print its URI: inference_image/build_and_push.sh [repository] [tag]
exec "$(dirname "$0")/../scripts/build_and_push.sh" inference_image "$@"
