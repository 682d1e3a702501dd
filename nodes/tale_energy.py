"""TALE energies inside ComfyUI: gradients through models loaded under inference mode, the CLIP-vision forward,
the CLIP and latent energies, the text target, and the memory estimate of the gradient passes.

Gradients under ComfyUI's inference mode: the UNet gets no-op weight wrappers (`with_grad_weights`: comfy.ops then
copies each weight at forward time outside inference mode); the VAE decoder and CLIP vision run on per-run copies
of their weights (`GradCopy`). The energies' maths is pure torch in kernels/tale.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import comfy.model_management

from ..kernels import tale as K
from ..kernels.tale import TALEParams
from . import adapters
from .tale_placement import NODE, Placement


# ----------------------------------------------------------------------------------------------
# Gradients inside ComfyUI
# ----------------------------------------------------------------------------------------------
def with_grad_weights(model):
    """A clone whose comfy-ops weights and biases get a no-op wrapper: comfy.ops then copies them at forward
    time, and a copy made outside inference mode can be saved for backward (research notes §1.10). Its attention
    is differentiable during the gradient passes (`differentiable_attention`)."""
    m = model.clone()
    for name, module in m.model.named_modules():
        if hasattr(module, "weight_function") and getattr(module, "weight", None) is not None:
            m.add_weight_wrapper(f"{name}.weight", _identity)
        if hasattr(module, "bias_function") and getattr(module, "bias", None) is not None:
            m.add_weight_wrapper(f"{name}.bias", _identity)
    options = m.model_options.setdefault("transformer_options", {})
    options[ATTENTION_OVERRIDE] = differentiable_attention(options.get(ATTENTION_OVERRIDE))
    return m


ATTENTION_OVERRIDE = "optimized_attention_override"
"""ComfyUI's chainable-by-hand hook around every attention call (comfy.ldm.modules.attention.wrap_attn)."""


def differentiable_attention(previous):
    """An attention override: calls whose query is tracked by autograd (the energy's gradient passes) go to ComfyUI's
    PyTorch attention (scaled_dot_product_attention, which has a backward); ComfyUI's sub-quadratic attention
    (CPUs and low-memory setups) exponentiates in place and Sage attention has no backward. Every other call goes to
    the previous override (another node's) or the attention ComfyUI chose."""
    import comfy.ldm.modules.attention as attention

    def override(func, *args, **kwargs):
        query = args[0] if args else kwargs.get("q")
        if torch.is_grad_enabled() and isinstance(query, torch.Tensor) and query.requires_grad:
            return attention.attention_pytorch(*args, **kwargs)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    return override


def _identity(t):
    return t


class _Bound(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, function):
        super().__init__()
        self.m = module
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(self.m, *args, **kwargs)


class GradCopy:
    """Calls `function(module, ...)` with per-run, non-inference copies of the module's parameters and buffers
    (made once), so gradients flow through a module that ComfyUI loaded under inference mode. The module itself
    is not changed (torch.func.functional_call swaps the copies in for the call only)."""

    def __init__(self, module: torch.nn.Module, function):
        self.bound = _Bound(module, function)
        with torch.inference_mode(False), torch.no_grad():
            self.state = {f"m.{k}": v.detach().clone() for k, v in module.named_parameters()}
            self.state.update({f"m.{k}": v.detach().clone() for k, v in module.named_buffers()})

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.bound, self.state, args, kwargs)


def _vae_decode(first_stage_model, z):
    return first_stage_model.decode(z)


def clip_vision_forward(net, pixels: torch.Tensor, layer: int):
    """ComfyUI's CLIP vision forward without its in-place residual adds (which autograd cannot go through):
    (patch tokens after transformer layer `layer` without the class token, projected image embedding)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    vm = net.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    tokens = None
    for i, block in enumerate(vm.encoder.layers):
        x = x + block.self_attn(block.layer_norm1(x), None, attention)
        x = x + block.mlp(block.layer_norm2(x))
        if i == layer:
            tokens = x[:, 1:]
    return tokens, net.visual_projection(vm.post_layernorm(x[:, 0, :]))


# ----------------------------------------------------------------------------------------------
# Energies in the host
# ----------------------------------------------------------------------------------------------
class ClipEnergy:
    """energy=clip: decode the predicted clean latent with the VAE, score it with CLIP vision."""

    def __init__(self, vae, clip_vision, model, text_embeds: torch.Tensor | None, placement: Placement,
                 params: TALEParams, family):
        comfy.model_management.load_models_gpu([vae.patcher, clip_vision.patcher])
        net = clip_vision.model
        if not hasattr(net, "vision_model") or not isinstance(getattr(net, "visual_projection", None),
                                                                torch.nn.Module):
            raise adapters.node_error(NODE, family, "energy=clip needs a CLIP vision model with a projection "
                                                    f"(got {type(net).__name__}).",
                                      "load a CLIP vision model (e.g. clip_vision_vit_l / CLIP-G), or use energy "
                                      "latent or none.")
        n_layers = len(net.vision_model.encoder.layers)
        if params.style_layer >= n_layers:
            raise adapters.node_error(NODE, family, f"style layer {params.style_layer} does not exist in this CLIP "
                                                    f"vision model ({n_layers} layers).", "use a CLIP vision model.")
        self.params = params
        self.box = placement.box
        self.mean, self.std = clip_vision.image_mean, clip_vision.image_std
        self.size = int(clip_vision.image_size)
        self.device = clip_vision.load_device
        self.vision = GradCopy(net, clip_vision_forward)
        self.vae = vae
        self.decoder = GradCopy(vae.first_stage_model, _vae_decode)
        self.latent_format = model.get_model_object("latent_format")
        with torch.inference_mode(False), torch.no_grad():
            # the reference gram: the background resized (bilinear, antialiased) to the CLIP size
            bg = placement.background.movedim(-1, 1).to(self.device, torch.float32)
            tokens, embeds = self.encode(K.clip_pixels(bg, self.size, self.mean, self.std, mode="bilinear",
                                                       antialias=True))
            self.reference_gram = K.gram(tokens).detach()
        self.text = None
        if text_embeds is None:  # text_weight 0: the style term only
            return
        with torch.inference_mode(False):
            text = text_embeds.to(self.device, torch.float32).reshape(1, -1)
        if text.shape[-1] != embeds.shape[-1]:
            raise adapters.node_error(NODE, family, f"the text embedding (pooled output, {text.shape[-1]} values) and "
                                                    f"the CLIP vision embedding ({embeds.shape[-1]}) have different "
                                                    "sizes, so they are not in one CLIP space.",
                                      "connect energy_text encoded with the CLIP text model matching clip_vision "
                                      "(CLIP-G vision: SDXL's prompt or a CLIP-G text encoder; CLIP-H vision: SD2.x's "
                                      "prompt), set text_weight 0, or use energy latent.")
        self.text = text

    def encode(self, pixels: torch.Tensor):
        return self.vision(pixels.to(self.device), self.params.style_layer)

    def __call__(self, denoised: torch.Tensor) -> K.EnergyTerms:
        z = self.latent_format.process_out(denoised).to(self.vae.device, self.vae.vae_dtype)
        image = (self.decoder(z).float() + 1.0) / 2.0
        return K.clip_energy(image.to(self.device), self.box, self.encode, self.text, self.reference_gram,
                             self.params, self.mean, self.std, self.size)


class LatentEnergy:
    def __init__(self, background_latent: torch.Tensor, placement: Placement, params: TALEParams):
        self.params = params
        with torch.inference_mode(False):
            self.mask = placement.latent_mask.clone()  # a normal tensor: it indexes tensors tracked by autograd
            self.box = K.mask_bbox(self.mask.float())
            self.reference_gram = K.latent_gram(K.latent_patch_features(background_latent)).detach()

    def __call__(self, denoised: torch.Tensor) -> K.EnergyTerms:
        return K.latent_energy(denoised, self.box, self.mask.to(denoised.device), self.reference_gram.to(
            denoised.device), self.params)


# ----------------------------------------------------------------------------------------------
# The text target
# ----------------------------------------------------------------------------------------------
CLIP_L_POOLED = 768
"""Size of a CLIP-L pooled output. Every CLIP-L text encoder of ComfyUI (SD1.x checkpoints through
`SD1CheckpointClipModel`, Load CLIP with clip_l, and the CLIP-L inside SD3/Flux) returns the *unprojected* pooled
output (`return_projected_pooled=False`: the final-layer-norm EOS token), which has CLIP-L vision's embedding size
but is not in its space. CLIP-G (SDXL) and OpenCLIP-H (SD2.x) pooled outputs are projected."""


def text_embeds(conditioning, family, from_positive: bool):
    """The text target of energy=clip: the pooled output of `conditioning` (1, D), fp32."""
    if from_positive and family.key == "sd1":
        raise adapters.node_error(
            NODE, family, "energy=clip with text_weight > 0 needs a text embedding in CLIP vision's space, but an "
                          "SD1.x prompt's pooled output is ComfyUI's unprojected CLIP-L output (SD1.x checkpoints "
                          "carry no CLIP-L text projection, and ComfyUI's CLIP-L encoders return the unprojected "
                          "pooled output), so it would compare the image with a vector of another space.",
            "connect energy_text: the prompt encoded (CLIPTextEncode) by Load CLIP with a CLIP-G text encoder "
            "(clip_g, then CLIP-G vision) or an OpenCLIP-H one (SD2's, then CLIP-H vision); or set text_weight 0 "
            "(style term only); or use energy latent or none.")
    pooled = None
    if conditioning:
        pooled = conditioning[0][1].get("pooled_output")
    if pooled is None:
        raise adapters.node_error(NODE, family, "energy=clip with text_weight > 0 needs a text embedding, but the "
                                                "conditioning has no pooled output.",
                                  "connect energy_text from CLIPTextEncode, set text_weight 0, or use energy latent "
                                  "or none.")
    if not from_positive and pooled.shape[-1] == CLIP_L_POOLED:
        adapters.warn_once("tale.clip_l_pooled", f"{adapters.PACK_NAME} {NODE} [model family: {family.name}]: "
                                                 f"energy_text has a {CLIP_L_POOLED}-value pooled output. ComfyUI's "
                                                 "CLIP-L text encoders return it unprojected (not in CLIP-L vision's "
                                                 "space), so the text term is then not a CLIP similarity. Encode the "
                                                 "prompt with a CLIP-G (or OpenCLIP-H) text encoder and use the "
                                                 "matching CLIP vision model, or set text_weight 0.")
    with torch.inference_mode(False):
        return pooled[:1].float().clone()  # a normal tensor: it meets tensors tracked by autograd


# ----------------------------------------------------------------------------------------------
# Memory of the gradient passes, before any allocation
# ----------------------------------------------------------------------------------------------
GIB = 1024 ** 3
UNET_GRAD_ACTIVATIONS = 25.16
"""Activations autograd keeps for one composite prediction with gradients (CFG batch), in units of ComfyUI's own
inference estimate of the UNet (latent area x batch x dtype size x 0.01 MiB x the model's memory_usage_factor).
From the cost figures of docs/tale.md (H200, SDXL fp16, 1024², random weights): energy latent peaks 16.0 GiB above
energy none; less the 4.8 GiB of weight copies that leaves 11.2 GiB. One unit there is 2 x 128 x 128 x 2 bytes x
0.01 MiB x 0.8 (SDXL's memory_usage_factor) = 0.512 GiB, so 11.2 / 0.512 = 21.875 units; x1.15 margin = 25.16.
With the weights counted twice (2 x 4.78 GiB), the estimate for that run is 22.44 GiB (measured peak 22.3 GiB)."""
VAE_GRAD_DECODE = 3.6
"""Activations of the VAE decode with gradients (energy clip), in units of the VAE's own decode estimate
(`vae.memory_used_decode`). Same figures: energy clip peaks 15.5 GiB above energy latent; less about 1 GiB of CLIP
vision and weight copies that leaves 14.5 GiB, 3.4 units (NVIDIA); x1.06 margin. Estimate for that run (ViT-L CLIP
vision): about 40.3 GiB (measured peak 37.8 GiB)."""
CLIP_VALUES_PER_TOKEN_LAYER = 24
"""Saved values per token, hidden unit and layer of a CLIP vision forward with gradients (attention, MLP 4x,
norms)."""


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class MemoryEstimate:
    parts: dict
    """Label -> bytes."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v > 0)
        return f"about {self.total / GIB:.2f} GiB ({detail})"


def gradient_memory(model, vae, clip_vision, params: TALEParams, latent_hw: tuple[int, int]) -> MemoryEstimate:
    """The device memory a run with energy gradients needs at its peak (a gradient pass, energy clip: through the
    VAE decoder and CLIP vision too): the models' weights, the weight copies kept for backward, the activations."""
    mm = comfy.model_management
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    batch = 1 if math.isclose(params.cfg, 1.0) else 2
    area = batch * latent_hw[0] * latent_hw[1]
    factor = float(getattr(base, "memory_usage_factor", 1.0))
    unet_weights = int(model.model_size())
    parts = {"UNet weights": unet_weights, "UNet weight copies for backward": unet_weights,
             "UNet activations": int(area * mm.dtype_size(dtype) * 0.01 * factor * 1024 * 1024
                                     * UNET_GRAD_ACTIVATIONS)}
    if params.energy == "clip" and clip_vision is not None:
        vae_bytes = _module_bytes(vae.first_stage_model)
        channels = int(model.get_model_object("latent_format").latent_channels)
        decode = float(vae.memory_used_decode((1, channels, *latent_hw), vae.vae_dtype))
        net = clip_vision.model
        clip_bytes = _module_bytes(net)
        conv = net.vision_model.embeddings.patch_embedding
        patch = int(conv.kernel_size[0])
        tokens = (int(clip_vision.image_size) // patch) ** 2 + 1
        hidden = int(conv.out_channels)
        layers = len(net.vision_model.encoder.layers)
        passes = int(params.text_weight > 0) + int(params.style_weight > 0)
        parts.update({"VAE weights and copies": 2 * vae_bytes,
                      "VAE decode activations": int(decode * VAE_GRAD_DECODE),
                      "CLIP vision weights and copies": 2 * clip_bytes,
                      "CLIP vision activations": passes * tokens * hidden * layers * CLIP_VALUES_PER_TOKEN_LAYER * 4})
    return MemoryEstimate(parts)


def loaded_model_bytes(device) -> int:
    """Memory held on `device` by the models ComfyUI has loaded (it unloads them when another needs the room)."""
    held = 0
    for loaded in list(comfy.model_management.current_loaded_models):
        try:
            if loaded.device == device and loaded.model is not None:
                held += int(loaded.model_loaded_memory())
        except Exception:  # a model being collected
            continue
    return held


def check_memory(model, vae, clip_vision, params: TALEParams, latent_hw: tuple[int, int], family
                 ) -> MemoryEstimate | None:
    """Refuse a gradient run whose estimated peak exceeds what the device has (free + held by unloadable models -
    ComfyUI's minimum inference reserve), before anything is allocated. None when the run takes no gradient (its
    memory is plain sampling's, which ComfyUI manages)."""
    if not params.optimising:
        return None
    estimate = gradient_memory(model, vae, clip_vision, params, latent_hw)
    device = model.load_device
    free = int(comfy.model_management.get_free_memory(device))
    held = loaded_model_bytes(device)
    reserve = int(comfy.model_management.minimum_inference_memory())  # what ComfyUI keeps free for itself
    if estimate.total > free + held - reserve:
        h, w = latent_hw
        raise adapters.node_error(
            NODE, family, f"energy={params.energy} at this size ({w}x{h} latent pixels) needs {estimate.text()} on "
                          f"{device} for its gradient passes, but {free / GIB:.2f} GiB is free there (+ "
                          f"{held / GIB:.2f} GiB held by loaded models ComfyUI can unload, - "
                          f"{reserve / GIB:.2f} GiB ComfyUI reserves).",
            "use energy none (no gradients: the memory of plain sampling), a smaller background (the activations "
            "grow with its area)" + (", or energy latent (no VAE decoder or CLIP in the gradient)"
                                     if params.energy == "clip" else "") + ".")
    return estimate
