"""Model loading, ONNX Runtime sessions, pre/post-processing and the batching pool.

This package knows nothing about the database or HTTP: it takes images and text and returns arrays.
"""
