"""moekit.plan"""
