"""What is specific to each compile target: CPU, CUDA, Metal.

The names here are plain data, importable without TVM; each target's module holds its TVM
target and schedule rules.
"""

AARCH64_LINUX = "aarch64-linux-gnu"  # the cross-compilation host triple --host accepts for cpu
ARCHS = ("sm_80", "sm_90")  # the CUDA archs the FeedbackAttention kernels are tiled for
METAL_HOSTS = ("arm64-apple-darwin", "arm64-apple-ios")  # the host triples --host accepts for metal (default: first)
