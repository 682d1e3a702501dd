"""Benchmarks of the pack's guidance techniques on a small trained diffusion model (see BENCHMARKS.md).

Scripts: train.py (the evaluation model), run.py (CPU suite), gpu.py (full-size timing on a GPU).
Nothing here is imported when ComfyUI loads the pack."""
