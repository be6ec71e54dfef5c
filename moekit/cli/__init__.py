"""moekit.cli"""
