"""nodes/memory.py: the memory estimate helper (held + largest phase per device), the refusal naming the estimate
and the free amount, what counts as available, and the host's own estimates it reads."""
from __future__ import annotations

import pytest
import torch

import host


@pytest.fixture(scope="module")
def mem(comfy_root):
    return host.pack_module("nodes.memory")


def test_peak_is_held_plus_the_largest_phase_per_device(mem):
    est = mem.Estimate()
    est.hold("cpu", "canvas", 100).hold("cpu", "latents", 20)
    est.phase("cpu", "unet", 500).phase("cpu", "vae", 700)
    est.phase("cuda:0", "other", 5)
    assert est.peak("cpu") == 820 and est.peak(torch.device("cuda:0")) == 5
    assert est.devices() == ["cpu", "cuda:0"]
    text = est.describe("cpu")
    assert "canvas" in text and "latents" in text and "largest step: vae" in text and "unet" not in text
    assert mem.tensor_bytes((2, 3, 4, 5)) == 480 and mem.tensor_bytes((10,), torch.float16) == 20
    assert mem.fmt_bytes(3 * mem.GiB) == "3.00 GiB" and mem.fmt_bytes(1.5 * mem.MiB) == "1.5 MiB"


def test_require_refuses_naming_node_family_estimate_and_free(mem, monkeypatch):
    import comfy.model_management
    adapters = host.pack_module("nodes.adapters")
    family = adapters.ModelFamily("sdxl", "SDXL", "SDXL")
    est = mem.Estimate().hold("cpu", "stage image", 3 * mem.GiB).phase("cpu", "UNet", 2 * mem.GiB)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 4 * mem.GiB)
    with pytest.raises(ValueError) as e:
        mem.require("DiffuseHigh", family, est, "use smaller stages.")
    text = str(e.value)
    for part in ("TFG DiffuseHigh [model family: SDXL]", "needs about 5.00 GiB on cpu", "stage image 3.00 GiB",
                 "largest step: UNet 2.00 GiB", "only 4.00 GiB is free", "Fix: use smaller stages."):
        assert part in text, (part, text)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 5 * mem.GiB)
    mem.require("DiffuseHigh", family, est, "x")   # fits exactly


def test_loaded_weights_on_the_same_gpu_count_as_available(mem, monkeypatch):
    """ComfyUI unloads or offloads loaded models to make room: their weights on that device are available; other
    devices' and the CPU's are not."""
    import comfy.model_management

    class Loaded:
        def __init__(self, device, size):
            self.device, self.size, self.model = torch.device(device), size, object()

        def model_loaded_memory(self):
            return self.size

    monkeypatch.setattr(comfy.model_management, "current_loaded_models",
                        [Loaded("cuda:0", 3 * mem.GiB), Loaded("cuda:1", 7 * mem.GiB), Loaded("cpu", 11)])
    assert mem.releasable_bytes("cuda:0") == 3 * mem.GiB
    assert mem.releasable_bytes("cpu") == 0
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1 * mem.GiB)
    est = mem.Estimate().phase("cuda:0", "UNet", 4 * mem.GiB)
    mem.require("X", None, est, "fix")
    with pytest.raises(ValueError, match=r"needs about 9.00 GiB on cuda:1.*only 1.00 GiB is free \+ 7.00 GiB of "
                                         r"loaded model weights"):
        mem.require("X", None, mem.Estimate().phase("cuda:1", "UNet", 9 * mem.GiB), "fix")


def test_host_estimates_are_read_from_the_model_and_the_vae(mem, sd15):
    """The model's estimate is ComfyUI's BaseModel.memory_required (linear in the area); the VAE's is ComfyUI's
    memory_used_decode/encode; tiles cost less than the whole image."""
    import tiny_models
    shape = (1, 4, 32, 32)
    assert mem.model_activation_bytes(sd15.model, shape) == int(sd15.model.model.memory_required(shape))
    assert mem.model_activation_bytes(sd15.model, (1, 4, 64, 64)) == pytest.approx(
        4 * mem.model_activation_bytes(sd15.model, shape), rel=1e-6)
    vae = tiny_models.build_tiny_vae("sd15")
    assert mem.vae_decode_bytes(vae, shape) == int(vae.memory_used_decode(shape, vae.vae_dtype))
    assert mem.vae_encode_bytes(vae, (1, 256, 256, 3)) == int(vae.memory_used_encode((1, 3, 256, 256),
                                                                                     vae.vae_dtype))
    assert mem.vae_decode_bytes(vae, (1, 4, 8, 8)) < mem.vae_decode_bytes(vae, shape)

    class NoEstimates:
        downscale_ratio = 8
    assert mem.vae_decode_bytes(NoEstimates(), shape) > 0 and mem.vae_encode_bytes(NoEstimates(), (1, 8, 8, 3)) > 0
