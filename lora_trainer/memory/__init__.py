"""What makes a model fit a small GPU: checkpointing a CUDA graph can capture, frozen weights stored in fp8."""
