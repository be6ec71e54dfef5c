"""moekit.distributed: expert parallelism on torch.distributed."""
