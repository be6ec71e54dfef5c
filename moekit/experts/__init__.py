"""Expert weights, their layout metadata, and the compute backends."""

from moekit.experts.backends import BACKENDS, ExpertsBackend, get_backend, register_backend
from moekit.experts.layout import ExpertLayout, apply_activation
from moekit.experts.segment_mm import segment_mm
from moekit.experts.weights import ExpertWeights

__all__ = [
    "BACKENDS",
    "ExpertLayout",
    "ExpertWeights",
    "ExpertsBackend",
    "apply_activation",
    "get_backend",
    "register_backend",
    "segment_mm",
]
