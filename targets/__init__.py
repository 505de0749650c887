"""What is specific to each compile target: CPU, CUDA, Metal."""
