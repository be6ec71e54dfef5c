"""moekit.train"""
