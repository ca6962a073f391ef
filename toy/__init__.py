"""The toy world: ToyVOC (the synthetic dataset), ToyNet (its stand-in for ImageNet pre-training) and the
toy-only diagnostics (docs/toy.md). Not part of the paper's pipeline."""
