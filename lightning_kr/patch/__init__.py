"""Per-patch dynamic convolution (second seed): HybridDense, PatchDynamicConv2d, autoencoder."""
