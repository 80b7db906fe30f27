"""ONNX export with numeric verification, and onnxruntime benchmarks. Installed as ``cstar_fx.export``.

Importing this package needs neither onnx nor onnxruntime; the functions say which extra to install.
"""
