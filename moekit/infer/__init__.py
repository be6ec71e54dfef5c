"""moekit.infer"""
