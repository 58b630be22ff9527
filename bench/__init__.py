"""Benchmarks, run from the repository root as modules; each prints a table and writes its section of
bench/RESULTS.md (pass --no-write to print only):

    python -m bench.throughput    training and sampling speed, ours vs diffusers' UNet2DModel (same network)
    python -m bench.quality       FID / precision / recall of every sampler on MNIST (and --distill rounds)
    python -m bench.edit_quality  inpainting, inversion and SDEdit on held-out digits
    python -m bench.superres      super-resolution 7x7 -> 28x28 on held-out digits
    python -m bench.budget        FID vs wall time at step budgets, ours vs the peers' recipes
    python -m bench.gpu_check     the one-shot GPU check (--dry-run: every part on CPU at tiny sizes)
"""
