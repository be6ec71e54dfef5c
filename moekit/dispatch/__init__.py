"""moekit.dispatch"""
