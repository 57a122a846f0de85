"""Export: verified ONNX (fp32 and mixed fp16), TensorRT engines, Triton repository, manifest."""
