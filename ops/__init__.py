"""The custom ops of the ai.sessa domain: their definitions and kernels."""
