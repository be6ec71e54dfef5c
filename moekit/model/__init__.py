"""moekit.model"""
