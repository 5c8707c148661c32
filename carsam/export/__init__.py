"""What a run keeps of its quantized model: `saved` (the fake-quantized model, reloadable and re-evaluable without
redoing the method), `packed` (integer weight codes in safetensors, dequantizing bit for bit) and `onnx_graph`
(opset-21 Q/DQ graphs for onnxruntime)."""
