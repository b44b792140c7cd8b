"""Benchmarks: our captioner and trainers beside the plain loops people would write, on random-weight models of
real shape. Not part of the engine: nothing in lora_trainer imports this package but the command line.

`python -m lora_trainer bench caption|train|lm` runs them (numbers on a GPU; `--size tiny` checks them on a CPU).
"""

from lora_trainer.bench.caption import bench_caption
from lora_trainer.bench.lm import bench_lm
from lora_trainer.bench.measure import synthetic_photos
from lora_trainer.bench.train import bench_train, real_shape_checkpoint

__all__ = ["bench_caption", "bench_lm", "bench_train", "real_shape_checkpoint", "synthetic_photos"]
