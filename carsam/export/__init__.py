"""What a run keeps of its quantized model: the saved fake-quantized model (`saved`), reloadable and
re-evaluable without redoing the method."""
