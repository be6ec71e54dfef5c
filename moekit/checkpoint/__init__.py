"""moekit.checkpoint"""
