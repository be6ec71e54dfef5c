"""Quantized weight formats, each a small module with a plain reference quantize and dequantize (the oracle every
fast path is tested against): the formats MoE checkpoints ship in (MXFP4 as gpt-oss, FP8 e4m3 with 128 x 128 block
scales as DeepSeek-V3 / Kimi-K2 / Qwen3-FP8, compressed-tensors pack-quantized INT4 as Kimi-K2.5's routed experts).
Loading them into models and the kernels that read them follow (issue 25)."""
