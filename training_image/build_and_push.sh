#!/usr/bin/env bash
# Build the training image, push it to ECR and print its URI: training_image/build_and_push.sh [repository] [tag]
exec "$(dirname "$0")/../scripts/build_and_push.sh" training_image "$@"
