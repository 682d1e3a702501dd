"""The pack's math: pure torch, no ComfyUI imports. Device and dtype come from the inputs."""
