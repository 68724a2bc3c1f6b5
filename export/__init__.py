"""samantic.export: ONNX wrappers, TensorRT builder, bundle writer, parity checks.

Never imported by the runtime path.
"""
