"""Negative Token Merging (NegToMe) node: a MODEL patch that pushes each image's attention features away from
a reference image's matching features, inside selected attention layers, during an early sigma window.

Placement, faithful to the official pipelines:
* SD1.x/SD2.x/SDXL: `attn1_output_patch` + `attn2_output_patch` (self and cross attention, after the output
  projection, before the residual add), each cond/uncond chunk separately.
* Flux: image tokens of every double and single block, before the output projection: a `dit` block replacement
  installs an `optimized_attention_override` for the duration of that block only, and edits the image-token
  slice of the attention output.
* SD3/SD3.5: image tokens of the joint attention output of the joint blocks (same mechanism; no official setting).
* Chroma (Flux-like double + single blocks), HunyuanVideo (double + single blocks, [img, txt] order), Qwen-Image
  (joint [txt, img] blocks), Wan 2.1/2.2 and LTX-Video (the image self-attention of every block): same mechanism,
  no official setting. Video tokens are frames x h x w per clip, merged across the clips of a batch.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

import comfy.model_sampling

import comfy.patcher_extension

from ..kernels.negtome import (BLOCK_PRESETS, MATCHINGS, PAPER_FLOW_MIN_SIGMA, PAPER_UNET_MIN_GRID,
                               PAPER_UNET_MIN_TIMESTEP, SIMILARITIES, WINDOWS, NegToMeParams, mask_to_tokens,
                               merge_batch, parse_block_list)
from ..kernels.negtome_span import custom_block_problems
from . import adapters, caches
from . import inputs as inp
from .negtome_install import dit_block_counts, install_dit, install_unet

DEFAULTS = NegToMeParams()
CATEGORY = "TFG/guidance"
NODE = "NegToMe"
REFERENCE_NODE = "NegToMe Reference"
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma", "hunyuan_video", "wan", "ltxv", "qwen_image")
CALL_INFO = "tfg_negtome_call"

_DESCRIPTION = (
    "Negative Token Merging (NegToMe; Singh et al., arXiv 2412.01339, CVPR 2025): inside selected attention "
    "layers, every image token that matches a reference token (cosine > threshold) is pushed away from it, "
    "(1+alpha)*x - alpha*matched, during the early, composition-setting steps. Diversity mode: the reference is "
    "batch image 0 (the official code; image 0 itself is unchanged), or all other images (our improvement); "
    "sample a batch of 2 or more. Works on SD1.x, SD2.x, SDXL (self and cross attention outputs of the output "
    "blocks, each CFG half separately), Flux and Chroma (image tokens of every double and single block, before the "
    "output projection), SD3/SD3.5 and Qwen-Image (image tokens of the joint attention of every block), "
    "HunyuanVideo (video tokens of every double and single block), Wan 2.1/2.2 (T2V and I2V) and LTX-Video (the "
    "video self-attention of every block); other families raise an error. Video: a clip's tokens are all its "
    "frames x h x w, and clips of a batch are pushed apart (sample 2 or more clips). Cost: no extra model passes; "
    "a chunked token-similarity search per active layer and step, in blocks of at most 64 MiB (the paper reports "
    "<4% more time on images; video token counts make it larger). The log reports per step how many layers merged "
    "tokens."
)

def _custom_blocks_problem(text: str) -> str | None:
    try:
        parse_block_list(text)
    except ValueError as e:
        return str(e)
    return None


def _window_rule(window, start_percent, end_percent) -> str | None:
    if window == "custom" and start_percent > end_percent:
        return f"start_percent ({start_percent:g}) must not exceed end_percent ({end_percent:g}) with window custom"
    return None


def _blocks_rule(blocks, custom_blocks) -> str | None:
    if blocks == "custom" and _custom_blocks_problem(custom_blocks) is None and not parse_block_list(custom_blocks):
        return "blocks custom needs a non-empty custom_blocks list, e.g. 'output.3-5'"
    return None


RULES = [inp.Rule(("window", "start_percent", "end_percent"), _window_rule),
         inp.Rule(("blocks", "custom_blocks"), _blocks_rule)]


def negtome_widgets(matchings: tuple[str, ...] = MATCHINGS) -> list:
    """The NegToMe parameter inputs, shared by the diversity and reference nodes (defaults: NegToMeParams)."""
    return [
        inp.Float("alpha", "Strength: matched tokens become (1+alpha)*x - alpha*matched; negative values pull toward "
                           "the reference (the paper's Fig. 2 goes down to -1). The default is the official one; on "
                           "small token grids (the pack's 8x8 digits benchmark) it barely acts, where alpha 3 with "
                           "threshold 0.3 raised diversity at unchanged accuracy",
                  neutral="0 (bit-identical to no patch)", paper="0.9 (SDXL and Flux pipelines; SDXL demo 1.5-1.9)",
                  min=-10.0, max=10.0, step=0.05),
        inp.Float("threshold", "tau: only tokens whose cosine similarity with their match exceeds this are merged. "
                               "One default for every family (Flux's official value is 0.65)",
                  neutral="1.0 (nothing matches)", paper="0.7 (SDXL), 0.65 (Flux)", min=-1.0, max=1.0, step=0.01),
        inp.Choice("matching", "official: the released negtome() maths, reference = image 0 (for each reference "
                               "token the best-matching token of the image decides; image 0 is unchanged). "
                               "best_match: the paper's wording, each token pushed from its own best match in "
                               "image 0. all_others: our improvement, each image pushed from its best match over "
                               "all other images (image 0 included)", matchings,
                   neutral="none (alpha 0 is neutral)", paper="official"),
        inp.Choice("window", "When merging is active. paper: the official window per family (SD1.x/SDXL: model "
                             "timestep >= 800, about the first 20% of the schedule; Flux/SD3: sigma >= 0.9, which "
                             "depends on the shift). custom: from start_percent to end_percent", WINDOWS,
                   paper="paper"),
        inp.Float("start_percent", "window=custom only: first active point of the schedule (0 = highest noise)",
                  paper="0", min=0.0, max=1.0, step=0.01),
        inp.Float("end_percent", "window=custom only: last active point of the schedule (1 = the end)",
                  neutral="start_percent = end_percent = 1 (no step is active)",
                  paper="about 0.2 (SDXL timestep 800) to 0.25-0.3 (Flux sigma 0.9, depends on the shift)",
                  min=0.0, max=1.0, step=0.01),
        inp.Choice("blocks", "Which attention layers. paper: SD1.x/SDXL output blocks whose token grid is at least "
                             f"{PAPER_UNET_MIN_GRID}x{PAPER_UNET_MIN_GRID} (SDXL 1024px: output 0-5; SD1.5 512px: "
                             "output 6-11; nothing below 256px), Flux/Chroma/HunyuanVideo every double+single block, "
                             "SD3/SD3.5 every joint block, Wan/LTX-Video/Qwen-Image every block (no official DiT "
                             "setting beyond Flux). all: every attention layer. custom: the custom_blocks list", BLOCK_PRESETS,
                   paper="paper"),
        inp.Text("custom_blocks", "blocks=custom only: comma-separated NAME.INDEX or NAME.FIRST-LAST. SD1.x/SDXL: "
                                  "input/middle/output (e.g. 'output.3-5'); Flux: double/single (e.g. 'double.0-18, "
                                  "single.0-37'); Chroma/HunyuanVideo: double/single; SD3/SD3.5: joint (e.g. "
                                  "'joint.0-23'); Wan, LTX-Video, Qwen-Image: block (e.g. 'block.0-9')",
                 check=_custom_blocks_problem, allowed="NAME.INDEX or NAME.FIRST-LAST items, comma-separated"),
        inp.Choice("similarity", "Precision of the token cosine similarities. model (default): in the model's dtype "
                                 "(bf16/fp16), as the released code. checked: the same, the matches nearest the "
                                 "threshold re-scored in fp32. fp32: the whole search in fp32 (several times slower "
                                 "per layer on GPUs). They differ only for tokens within about 0.03 (bf16) of the "
                                 "threshold or between near-equal matches; identical on fp32 models (CPU)",
                   SIMILARITIES,
                   paper="model (the released code's dtype)"),
    ]


# ----------------------------------------------------------------------------------------------
# Per-run state
# ----------------------------------------------------------------------------------------------
@dataclass
class NegToMeRunState:
    sigma_high: float
    sigma_low: float
    schedule: torch.Tensor | None = None
    """The run's sigma schedule on the CPU (step indices without reading the GPU)."""
    layers_by_step: dict = field(default_factory=lambda: defaultdict(int))
    """Step index -> number of layer applications that merged at least one token (filled by `settle`)."""
    tokens_by_step: dict = field(default_factory=lambda: defaultdict(int))
    """Step index -> tokens merged (filled by `settle`)."""
    evaluated_in_window: int = 0
    evaluations: int = 0
    falling: bool = False
    """The run's model calls never go back up in sigma (adapters.calls_at_falling_sigmas)."""
    past_window: bool = False
    """A call was below the window and `falling`: no later call can be in it, so none reads its sigma back."""
    pending: list = field(default_factory=list)
    """(step, merged-token count as a device tensor) per layer application, not yet read back: the hot path never
    synchronises with the GPU; `settle` reads them all at once when the run ends."""

    def active(self, sigma: float) -> bool:
        tol = 1e-5 * max(1.0, abs(sigma))
        return self.sigma_low - tol <= sigma <= self.sigma_high + tol

    def call_sigma(self, t: torch.Tensor) -> float | None:
        """The sigma of a model call (a read-back: the host waits for the GPU's queued work), or None once the run
        has left the window for good."""
        if self.past_window:
            return None
        sigma = float(t.flatten()[0])
        if self.falling and sigma < self.sigma_low and not self.active(sigma):
            self.past_window = True
        return sigma

    def record(self, step: int, merged: torch.Tensor) -> None:
        self.pending.append((step, merged))

    def settle(self) -> None:
        """Read the pending counts back (one transfer per device) into layers_by_step / tokens_by_step."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        by_device: dict = defaultdict(list)
        for n, (_, merged) in enumerate(pending):
            by_device[merged.device].append(n)
        counts = [0] * len(pending)
        for positions in by_device.values():
            values = torch.stack([pending[n][1].reshape(()) for n in positions]).tolist()
            for n, v in zip(positions, values):
                counts[n] = int(v)
        for (step, _), merged in zip(pending, counts):
            if merged:
                self.layers_by_step[step] += 1
                self.tokens_by_step[step] += merged

    def summary(self) -> str:
        steps = " ".join(f"{s}:{n}" for s, n in sorted(self.layers_by_step.items())) or "none"
        return (f"window sigma [{self.sigma_low:.4g}, {self.sigma_high:.4g}]; layers that merged per step: {steps}; "
                f"tokens merged: {sum(self.tokens_by_step.values())}")


LAST_RUN: dict[str, NegToMeRunState] = {}
"""The state of the last finished run per patch key (for reports and tests); the newest LAST_RUN_KEEP only."""
LAST_RUN_KEEP = 64


def _sigma_window(model, family: adapters.ModelFamily, params: NegToMeParams) -> tuple[float, float]:
    """(high, low) sigma bounds of the active window for this model."""
    if params.window == "custom":
        return (adapters.percent_to_sigma(model, params.start_percent),
                adapters.percent_to_sigma(model, params.end_percent))
    sampling = model.get_model_object("model_sampling")
    high = adapters.percent_to_sigma(model, 0.0)
    if family.is_flow:
        return max(high, 1.0), PAPER_FLOW_MIN_SIGMA
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) and \
            not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteEDM):
        return high, float(sampling.sigma(torch.tensor(PAPER_UNET_MIN_TIMESTEP)))
    # Continuous/EDM sampling (Playground v2.5, CosXL, ModelSamplingContinuousEDM): the official window is DDPM
    # t >= 800 of the SD scaled-linear schedule, i.e. the same noise level sigma(800).
    return high, _sd_scaled_linear_sigma(PAPER_UNET_MIN_TIMESTEP)


def _sd_scaled_linear_sigma(timestep: float) -> float:
    """sigma at a DDPM timestep of the SD1.x/SDXL scaled-linear schedule (betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    a = float(alphas_cumprod[int(round(timestep))])
    return ((1.0 - a) / a) ** 0.5


def _sigma_of(transformer_options: dict) -> float | None:
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    return float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) else float(sigmas)


# ----------------------------------------------------------------------------------------------
# Installation
# ----------------------------------------------------------------------------------------------
def _arch(family: adapters.ModelFamily) -> str:
    return "unet" if family.is_unet else family.key


def _selected_custom(params: NegToMeParams, family: adapters.ModelFamily, counts: dict[str, int],
                     node_name: str) -> frozenset:
    """The custom block list, checked against the model's block names (and counts for DiTs)."""
    problems = custom_block_problems(params.custom_blocks, _arch(family), counts)
    if problems:
        raise adapters.node_error(node_name, family, "; ".join(problems) + ".", "correct custom_blocks.")
    return parse_block_list(params.custom_blocks)


def apply_negtome(model, params: NegToMeParams, node_name: str = NODE, reference=None):
    """Clone `model` and install NegToMe on the clone. Returns (clone, key).

    `reference` (reference-image mode) is a `ReferenceImage` (its latent goes in as image 0 of every chunk on
    active steps; its mask limits the reference tokens); None = diversity mode."""
    problems = params.validate()
    if problems:
        raise adapters.node_error(node_name, None, "; ".join(problems), "correct the inputs.")
    family = adapters.resolve_family(
        node_name, model, SUPPORTED,
        "this architecture has no patch points NegToMe knows (it needs UNet attention output patches or the DiT "
        "blocks of Flux, Chroma, SD3/SD3.5, Qwen-Image, HunyuanVideo, Wan 2.1/2.2 or LTX-Video).",
        "use an SD1.x, SD2.x, SDXL, SD3/SD3.5, Flux, Chroma, Qwen-Image, HunyuanVideo, Wan or LTX-Video model, or "
        "remove this node.",
        "the SD1.x/SDXL placement is used")
    m = model.clone()
    key = adapters.new_patch_key("negtome")
    if reference is not None:
        if params.matching == "all_others":
            raise adapters.node_error(node_name, family, "matching all_others compares generated images with each "
                                                         "other; the reference mode has one reference image.",
                                      "use matching official or best_match.")
        reference.model_sampling = m.get_model_object("model_sampling")
    arch = _arch(family)
    counts = {} if arch == "unet" else dit_block_counts(m, family, node_name)
    custom = _selected_custom(params, family, counts, node_name) if params.blocks == "custom" else None
    merge = _make_merge(params, family, node_name, key, reference)
    info_key = CALL_INFO + key
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key,
                           _make_apply_model(params, key, info_key, reference))
    adapters.install_run_state(m, key, *_run_state_hooks(params, family, node_name, key, reference))
    if arch == "unet":
        install_unet(m, key, info_key, params.blocks, custom, merge)
    else:
        install_dit(m, key, info_key, family, counts, custom, merge, node_name)
    return m, key


def _run_state_hooks(params: NegToMeParams, family: adapters.ModelFamily, node_name: str, key: str,
                     reference=None):
    """(make_state, finish) for adapters.install_run_state: a fresh NegToMeRunState per run, read back and
    reported once when the run ends."""

    def make_state(guider, run: adapters.RunInfo) -> NegToMeRunState:
        high, low = _sigma_window(guider.model_patcher, family, params)
        state = NegToMeRunState(high, low, schedule=run.sigmas, falling=run.falling)
        if reference is not None and params.alpha != 0.0:  # the reference row is inserted on active steps only
            caches.refuse_layout_change(guider, node_name, family, run.sigmas, state.active)
        return state

    def finish(state: NegToMeRunState, guider) -> None:
        state.settle()  # the only read-back of the merged-token counts
        LAST_RUN[key] = state
        while len(LAST_RUN) > LAST_RUN_KEEP:  # keep the newest runs only
            LAST_RUN.pop(next(iter(LAST_RUN)))
        report = state.summary()
        setattr(guider, "tfg_negtome_report", report)
        adapters.logger.info("%s %s [%s]: %s", adapters.PACK_NAME, node_name, family.name, report)
        if not state.layers_by_step and state.evaluations and params.alpha != 0.0:
            why = ("no sampling step fell inside the window" if state.evaluated_in_window == 0 else
                   "no selected layer matched any token (blocks preset, custom list, resolution or threshold)")
            adapters.warn_once(
                f"{key}.idle",
                f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: the run merged no tokens: {why}. "
                "Check window/start_percent/end_percent, blocks (paper needs a token grid of at least "
                f"{PAPER_UNET_MIN_GRID} on SD1.x/SDXL, i.e. 256px latents and up), or lower threshold.")

    return make_state, finish


def _make_merge(params: NegToMeParams, family: adapters.ModelFamily, node_name: str, key: str, reference):
    """The per-layer NegToMe call: merge(tokens (B, N, D), cond_or_uncond, state, step, grid, into=None)."""
    n_warned_single = f"{key}.batch1"

    def merge(tokens: torch.Tensor, cond_or_uncond: list, state: NegToMeRunState, step: int,
              grid: tuple[int, int] | None, into: torch.Tensor | None = None) -> torch.Tensor:
        """NegToMe on one layer's image tokens, cond/uncond chunks apart; the result goes to `into` when given.
        No host synchronisation: the count is recorded as a device tensor."""
        n_chunks = max(1, len(cond_or_uncond))
        per_chunk = tokens.shape[0] // n_chunks
        if per_chunk < 2 and reference is None:
            adapters.warn_once(
                n_warned_single,
                f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: diversity mode needs a batch of "
                "2 or more images (image 0 is the reference); with batch size 1 it changes nothing. Raise the "
                "latent batch size, or use NegToMe Reference (TFG) with a reference image.")
            return tokens
        ref_mask = None
        if reference is not None and reference.mask is not None:
            if grid is None:
                raise adapters.node_error(node_name, family, f"cannot map {tokens.shape[1]} tokens to a grid to "
                                                             "resize the mask.", "report this with the latent size.")
            ref_mask = reference.token_mask(grid, tokens.device)
        out, merged = merge_batch(tokens, n_chunks, params.alpha, params.threshold, params.matching, ref_mask,
                                  params.budget_bytes, params.similarity, out=into)
        if out is not tokens and state is not None:
            state.record(step, merged)
        return out

    return merge


def _make_apply_model(params: NegToMeParams, key: str, info_key: str, reference):
    """The APPLY_MODEL wrapper: decides per network call whether the window is active (the one read-back per
    call, the call's sigma, until the run has left the window for good), passes the call's info to the layer
    patches and, in reference mode, inserts the reference row on active calls."""

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        state = adapters.run_state({"transformer_options": transformer_options}, key)
        sigma = None if state is None else state.call_sigma(t)
        in_window = state is not None and sigma is not None and state.active(sigma)
        active = in_window and params.alpha != 0.0
        if state is not None:
            state.evaluations += 1
            state.evaluated_in_window += int(in_window)
        schedule = state.schedule if state is not None and state.schedule is not None else \
            transformer_options.get("sample_sigmas")
        info = {"active": active, "step": -1 if sigma is None else adapters.step_index(sigma, schedule),
                "height": x.shape[-2], "width": x.shape[-1], "frames": x.shape[-3] if x.dim() == 5 else None,
                "txt_len": None if c_crossattn is None else c_crossattn.shape[1]}
        options = {**transformer_options, info_key: info}
        if reference is not None and active:
            return reference.run(executor, x, t, c_concat, c_crossattn, control, options, kwargs, sigma)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    return apply_model


# ----------------------------------------------------------------------------------------------
# Reference-image mode
# ----------------------------------------------------------------------------------------------
def _expand_rows(value, n_chunks: int, per_chunk: int):
    """Insert a copy of each chunk's first row at the chunk's start (tensors, and lists of tensors, whose
    first dimension is the batch); anything else is returned as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_chunks * per_chunk:
        parts = []
        for chunk in value.chunk(n_chunks, dim=0):
            parts += [chunk[:1], chunk]
        return torch.cat(parts, dim=0)
    if isinstance(value, list):
        return [_expand_rows(v, n_chunks, per_chunk) for v in value]
    return value


class ReferenceImage:
    """The reference image of NegToMe's reference mode: a (1, C, h, w) latent in the sampler's space,
    inserted at index 0 of every cond/uncond chunk on active steps, clean or noised to the current sigma,
    its own output discarded."""

    def __init__(self, latent: torch.Tensor, mask: torch.Tensor | None, noised: bool, node_name: str,
                 family: adapters.ModelFamily):
        self.latent = latent
        self.mask = mask
        self.noised = noised
        self.node_name = node_name
        self.family = family
        self.model_sampling = None
        self._token_masks: dict = {}

    def token_mask(self, grid: tuple[int, ...], device) -> torch.Tensor:
        """The mask at a layer's token grid (computed once per grid and device, not per layer call); a video grid
        (frames, h, w) repeats the (h, w) mask on every frame (frame-major, like the tokens)."""
        key = (grid, str(device))
        if key not in self._token_masks:
            flat = mask_to_tokens(self.mask.to(device), tuple(grid[-2:]))
            self._token_masks[key] = flat.repeat(grid[0]) if len(grid) == 3 else flat
        return self._token_masks[key]

    def row(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        ref = self.latent
        if ref.dim() == 5 and x.dim() == 4:  # a one-frame video latent on an image model's 4-D latents
            ref = ref[:, :, 0]
        if x.dim() == 5:
            # video (or Qwen-Image's one-frame 5-D) latents: the reference frame is held still over every frame
            ref = ref[:, :, 0] if ref.dim() == 5 else ref
            ref = self._resized(ref, x.shape[-2:])
            ref = ref.unsqueeze(2).expand(-1, -1, x.shape[2], -1, -1).contiguous()
        else:
            ref = self._resized(ref, x.shape[-2:])
        ref = ref.to(device=x.device, dtype=x.dtype)
        if ref.shape[1] != x.shape[1]:
            raise adapters.node_error(
                self.node_name, self.family, f"the reference latent has {ref.shape[1]} channels, the model samples "
                f"{x.shape[1]}.", "connect the VAE that belongs to this model.")
        if not self.noised:
            return ref
        # fresh noise each step, as the official pipelines draw it, but reproducible: seeded by the step's sigma
        g = torch.Generator().manual_seed(int(round(sigma * 1e6)) % (2 ** 31))
        noise = torch.randn(tuple(ref.shape), generator=g).to(device=x.device, dtype=x.dtype)
        s = torch.full((1,), sigma, device=x.device, dtype=x.dtype)
        return self.model_sampling.noise_scaling(s, noise, ref)

    def _resized(self, ref: torch.Tensor, size) -> torch.Tensor:
        """The (1, C, h, w) reference latent at the sampled latent's (h, w): bilinear, one warning per size."""
        x_size = tuple(size)
        if tuple(ref.shape[-2:]) != x_size:
            adapters.warn_once(
                f"negtome.refsize.{id(self)}.{x_size}",
                f"{adapters.PACK_NAME} {self.node_name} [model family: {self.family.name}]: the reference image "
                f"encodes to a {tuple(ref.shape[-2:])} latent but the sampled latent is {x_size}; the "
                "reference latent is resized (bilinear). Resize the image to the generation size for a faithful "
                "reference.")
            ref = torch.nn.functional.interpolate(ref.float(), size=x_size, mode="bilinear", align_corners=False)
        return ref

    def run(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, kwargs, sigma):
        if control is not None:
            raise adapters.node_error(
                self.node_name, self.family, "the reference mode adds a batch row, which ControlNet outputs computed "
                "for the original batch cannot follow.", "remove the ControlNet, or use diversity mode (NegToMe).")
        kinds = transformer_options.get("cond_or_uncond", [0])
        n_chunks = max(1, len(kinds))
        per_chunk = x.shape[0] // n_chunks
        ref = self.row(x, sigma)
        parts = []
        for chunk in x.chunk(n_chunks, dim=0):
            parts += [ref, chunk]
        x_ext = torch.cat(parts, dim=0)
        ext = lambda v: _expand_rows(v, n_chunks, per_chunk)  # noqa: E731
        extra = {k: ext(v) for k, v in kwargs.items()}
        out = executor(x_ext, ext(t), ext(c_concat), ext(c_crossattn), control, transformer_options, **extra)
        keep = [row for c in range(n_chunks) for row in range(c * (per_chunk + 1) + 1, (c + 1) * (per_chunk + 1))]
        return out[keep]


def encode_reference(model, vae, image: torch.Tensor, node_name: str, family: adapters.ModelFamily) -> torch.Tensor:
    """The first image of `image` (B, H, W, C) as a (1, C, h, w) latent in the sampler's space; a video VAE's
    (1, C, T, h, w) latent keeps its first frame, (1, C, 1, h, w) (held still over the sampled frames later)."""
    if image.shape[0] > 1:
        adapters.warn_once(f"negtome.refbatch.{node_name}",
                           f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: {image.shape[0]} "
                           "reference images given; only the first is used.")
    with torch.inference_mode(False), torch.no_grad():
        latent = vae.encode(image[:1, :, :, :3])
    latent_format = model.get_model_object("latent_format")
    if latent.dim() == 5:
        latent = latent[:, :, :1]
    elif latent.dim() != 4:
        raise adapters.node_error(node_name, family, f"the VAE returned a {latent.dim()}-D latent; NegToMe's "
                                                     "reference mode needs an image or video VAE.",
                                  "connect the model's VAE.")
    return latent_format.process_in(latent.float()).cpu()

# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
class NegToMe(io.ComfyNode):
    """MODEL patch, diversity mode: images of a batch are pushed apart."""

    INPUTS = inp.NodeInputs(NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model to patch; sample a batch of 2 or more images.")),
        *negtome_widgets(),
    ], rules=RULES, defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_NegToMe",
            display_name="NegToMe (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION,
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model with Negative Token Merging installed.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        patched, _ = apply_negtome(v.model, cls.INPUTS.params(v), NODE)
        return io.NodeOutput(patched)


MIN_REFERENCE_PIXELS = 16
"""Smallest reference image side (two latent pixels of an 8x VAE)."""


class NegToMeReference(io.ComfyNode):
    """MODEL patch, reference-image mode: every generated image is pushed away from a reference image.

    Shapes (tested): of a batch of reference images the first is used (one warning); a reference of another size
    than the sampled latent is resized to it (bilinear, one warning per size); a mask of any size is resized to
    each layer's token grid (area), and of a batch of masks the first is used; an image smaller than
    MIN_REFERENCE_PIXELS on a side is an error."""

    INPUTS = inp.NodeInputs(REFERENCE_NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model to patch.")),
        inp.Socket(io.Vae.Input("vae", tooltip="The VAE of this model, to encode the reference image.")),
        inp.Socket(io.Image.Input("image", tooltip="The reference image to avoid (the first of a batch is used). "
                                                   "Best at the generation size; otherwise its latent is resized "
                                                   "(bilinear) to the sampled size. Video models: the image is "
                                                   "held still over every sampled frame (a still reference "
                                                   "clip)."), finite=True),
        inp.Bool("noise_reference", "False: insert the clean reference latent every step. True: noise it to the "
                                    "current sigma first (fresh noise per step, seeded by the step's sigma)",
                 paper="False (official noise_rag=False)", param=None, default=False),
        inp.Socket(io.Mask.Input("mask", optional=True,
                                 tooltip="Optional: only the reference's tokens under the mask (>= half covered) "
                                         "can be matched; any size (resized to each layer's token grid), the first "
                                         "of a batch is used. An empty mask matches nothing (the node then does "
                                         "nothing and warns)."), finite=True),
        *negtome_widgets(("official", "best_match")),
    ], rules=RULES, defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_NegToMeReference",
            display_name="NegToMe Reference (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION.split(" Diversity mode:")[0] + (
                " Reference mode (the paper's copyright/style-avoidance use): a reference image, encoded with the "
                "VAE, is inserted as image 0 of every CFG chunk on active steps, clean or noised to the current "
                "sigma, and every generated image is pushed away from it (an optional mask limits which reference "
                "tokens can be matched); its own output is discarded. Video (Wan 2.1/2.2, HunyuanVideo, LTX-Video): "
                "the reference image is held still over every frame (one reference clip of the sampled length) and "
                "every clip's tokens are matched against all of that clip's tokens; a mask applies to every frame. "
                "Works on SD1.x, SD2.x, SDXL, Flux, Chroma, SD3/SD3.5, Qwen-Image, HunyuanVideo, Wan 2.1/2.2 and "
                "LTX-Video (not with ControlNet). Cost: one extra batch row per CFG chunk on active steps only."),
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model with NegToMe's reference mode installed.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        model, image, mask = v.model, v.image, v.mask
        family = adapters.detect_family(model)
        if image.dim() != 4 or min(image.shape[1], image.shape[2]) < MIN_REFERENCE_PIXELS:
            raise adapters.node_error(
                REFERENCE_NODE, family, f"the reference image is {tuple(image.shape[1:3])} pixels; it needs at least "
                f"{MIN_REFERENCE_PIXELS} on each side to give a latent.", "connect a larger image (best: the "
                "generation size).")
        if mask is not None:
            mask = mask[0] if mask.dim() == 3 else mask
            if not bool((mask >= 0.5).any()):
                # once per node execution (ComfyUI re-executes the node only when its inputs change)
                adapters.logger.warning(
                    "%s %s [model family: %s]: the mask is empty, so no reference token can be matched and the node "
                    "does nothing. Paint the region of the reference to avoid, or disconnect the mask to use the "
                    "whole image.", adapters.PACK_NAME, REFERENCE_NODE, family.name)
                return io.NodeOutput(model)
            mask = mask.float().cpu()
        if family.key in SUPPORTED or adapters.as_sd_unet(model, family) is not None:
            latent = encode_reference(model, v.vae, image, REFERENCE_NODE, family)
        else:
            latent = None  # apply_negtome raises the family error
        reference = ReferenceImage(latent, mask, v.noise_reference, REFERENCE_NODE, family)
        patched, _ = apply_negtome(model, params, REFERENCE_NODE, reference=reference)
        return io.NodeOutput(patched)


NODES = [NegToMe, NegToMeReference]
