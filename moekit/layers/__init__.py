"""moekit.layers"""
