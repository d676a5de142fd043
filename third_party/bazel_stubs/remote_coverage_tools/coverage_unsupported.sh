#!/bin/sh
# Offline stand-in for Bazel's coverage tools (see third_party/bazel_stubs/README.md).
echo "bazel coverage is not supported by the offline Bazel setup of this project;" >&2
echo "measure coverage with pytest outside Bazel instead." >&2
exit 1
