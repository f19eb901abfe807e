#!/usr/bin/env bash
# Build one of the project's images, push it to ECR and print its URI (the only line on stdout).
#
#   scripts/build_and_push.sh <training_image|inference_image> [repository-name] [tag]
#
# Defaults: repository skin-lesion-<training|inference>, tag = short git commit (or a timestamp). Region from AWS_REGION,
# AWS_DEFAULT_REGION or the CLI profile. Needs docker and the AWS CLI v2 with ECR permissions.
set -euo pipefail

IMAGE_DIR="${1:?usage: scripts/build_and_push.sh <training_image|inference_image> [repository-name] [tag]}"
shift
case "${IMAGE_DIR}" in
  training_image) DEFAULT_REPO=skin-lesion-training ;;
  inference_image) DEFAULT_REPO=skin-lesion-inference ;;
  *) echo "unknown image directory ${IMAGE_DIR}" >&2; exit 2 ;;
esac
REPO_NAME="${1:-${DEFAULT_REPO}}"
TAG="${2:-$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)}"
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region || true)}}"
if [[ -z "${REGION}" ]]; then
  echo "set AWS_REGION (or AWS_DEFAULT_REGION)" >&2
  exit 1
fi
ACCOUNT="$(aws sts get-caller-identity --query Account --output text)"
REGISTRY="${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com"
IMAGE_URI="${REGISTRY}/${REPO_NAME}:${TAG}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if ! aws ecr describe-repositories --region "${REGION}" --repository-names "${REPO_NAME}" >/dev/null 2>&1; then
  aws ecr create-repository --region "${REGION}" --repository-name "${REPO_NAME}" \
    --image-scanning-configuration scanOnPush=true --image-tag-mutability IMMUTABLE >/dev/null
fi
aws ecr get-login-password --region "${REGION}" | docker login --username AWS --password-stdin "${REGISTRY}" >&2

# The context is the repository root (both images copy lesionml/); BuildKit honours <image>/Dockerfile.dockerignore,
# which keeps .venv and data out of it.
DOCKER_BUILDKIT=1 docker build --platform linux/amd64 -f "${ROOT}/${IMAGE_DIR}/Dockerfile" \
  -t "${REPO_NAME}:${TAG}" "${ROOT}" >&2
docker tag "${REPO_NAME}:${TAG}" "${IMAGE_URI}"
docker push "${IMAGE_URI}" >&2
echo "${IMAGE_URI}"
