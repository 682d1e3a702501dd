"""ComfyUI's step caches (EasyCache and LazyCache, comfy_extras/nodes_easycache.py) in the same graph as the pack's
uncond-skipping techniques (Adaptive Guidance, LinearAG) and NegToMe.

Both cache nodes put a holder into `transformer_options["easycache"]`:
* LazyCache wraps PREDICT_NOISE, i.e. the whole CFG step of the whole batch: a skipped step reuses the last
  (denoised - x) of the batch and the pack's hooks are not called at all on that step. Nothing to reconcile, except
  what needs every step's predictions (LinearAG's fitted coefficients, LinearAG Record: refused below).
* EasyCache wraps the diffusion model and keeps one cached (output - input) per conditioning uuid, with the rows
  of the model call that computed it. It decides to skip on the calls that contain its "first cond" uuid (in plain
  CFG that is the negative's: ComfyUI batches the uncond first), and its CALC_COND_BATCH wrapper clears the decision
  before every calc_cond_batch call. Adaptive Guidance changes what runs per step: the uncond pass disappears
  (latch, guidance interval, LinearAG's estimated / cond-only steps), comes back, or runs for the open images only.
  Left alone, a skipped step then adds an uncond difference of another row count (a shape error, or silent
  broadcasting with one row), one that does not exist yet (KeyError), or one from an older step than the cond's
  (a cond/uncond pair from different steps: the cfg scale amplifies the cond's drift).

The policy for an EasyCache run under Adaptive Guidance / LinearAG (`prepare_run` at the start, `before_step` before
the passes of every step):
1. EasyCache's CALC_COND_BATCH wrapper is moved outermost for the run, so its decision covers every pass of a step.
2. EasyCache decides on the cond pass (the one Adaptive Guidance always computes), and within its range the cond
   pass runs first and the uncond pass (all rows, or the open images) as a second call that follows the decision
   (ComfyUI would batch the uncond first, or run it first when memory is short, and EasyCache would decide on it).
3. A step may be skipped only when every uncond uuid of the step has a difference computed on the same step as the
   cond's and for the same rows; otherwise the step is computed (EasyCache's own "not skipping" branch).
4. Adaptive Guidance latches only on computed steps (`step_reused`): on a reused step the cond and uncond
   predictions are the current input plus old differences, and that shared input pulls their cosine towards 1.
NegToMe's reference mode adds a reference row to every pass inside its window; EasyCache compares and reuses per-row
states across steps, so a window edge inside EasyCache's range is refused (`refuse_layout_change`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import comfy.patcher_extension

from . import adapters

HOLDER_KEY = "easycache"
"""Where both core cache nodes keep their holder in transformer_options."""
EASYCACHE_WRAPPER_KEY = "easycache"
"""The key of EasyCache's wrappers (LazyCache's are "lazycache")."""
EASYCACHE = "EasyCache"
LAZYCACHE = "LazyCache"
_EASYCACHE_FIELDS = ("uuid_cache_diffs", "first_cond_uuid", "initial_step", "skip_current_step",
                     "cumulative_change_rate", "relative_transformation_rate", "x_prev_subsampled",
                     "output_prev_norm", "start_percent", "end_percent", "is_past_end_timestep",
                     "should_do_easycache")
_LAZYCACHE_FIELDS = ("cache_diff", "start_percent", "end_percent", "total_steps_skipped")


def holder_of(model_options: dict):
    """The cache holder of this run (EasyCache's or LazyCache's), or None."""
    return (model_options or {}).get("transformer_options", {}).get(HOLDER_KEY)


def cache_kind(holder) -> str | None:
    """EASYCACHE, LAZYCACHE, or None when `holder` is neither (no cache, or one of a version the pack does not
    know)."""
    if holder is None:
        return None
    if all(hasattr(holder, name) for name in _EASYCACHE_FIELDS):
        return EASYCACHE
    if all(hasattr(holder, name) for name in _LAZYCACHE_FIELDS) and not hasattr(holder, "uuid_cache_diffs"):
        return LAZYCACHE
    return None


def _holder_name(holder) -> str:
    return str(getattr(holder, "name", None) or type(holder).__name__)


def _unknown(holder, node_name: str, family) -> ValueError:
    return adapters.node_error(
        node_name, family, f"the step cache in this graph ({_holder_name(holder)}, transformer_options"
                           f"['{HOLDER_KEY}']) is not ComfyUI's EasyCache or LazyCache as the pack knows them, so "
                           f"{node_name} cannot keep the cache from reusing predictions of passes it changed.",
        f"remove the cache node, or remove {node_name} (or update the pack).")


# ----------------------------------------------------------------------------------------------
# Start of a run
# ----------------------------------------------------------------------------------------------
def prepare_run(guider, node_name: str, family) -> str | None:
    """For Adaptive Guidance / LinearAG, at the start of a run (make_state): refuse what cannot be made correct and
    put EasyCache's CALC_COND_BATCH wrapper outermost in the run's own model_options (point 1 of the policy).
    Returns the cache kind (or None)."""
    holder = holder_of(guider.model_options)
    if holder is None:
        return None
    kind = cache_kind(holder)
    if kind is None:
        raise _unknown(holder, node_name, family)
    if kind == EASYCACHE:
        if guider.model_options.get("context_handler") is not None:
            raise adapters.node_error(
                node_name, family, "EasyCache and context windows are both active: EasyCache keeps one cached "
                                   "difference per prompt, but the model is evaluated once per window, so a skipped "
                                   "window would receive another window's difference.",
                "use LazyCache (it caches whole steps) with context windows, or remove one of the two nodes.")
        _cache_wrapper_first(guider.model_options)
    return kind


def _cache_wrapper_first(model_options: dict) -> None:
    """EasyCache's CALC_COND_BATCH wrapper first (outermost) in this run's wrappers; a new dict, so the model's
    own wrappers are untouched."""
    wrappers = model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    ccb = wrappers.get(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH)
    key = EASYCACHE_WRAPPER_KEY
    if not ccb or key not in ccb or next(iter(ccb)) == key:
        return
    wrappers[comfy.patcher_extension.WrappersMP.CALC_COND_BATCH] = {key: ccb[key],
                                                                    **{k: v for k, v in ccb.items() if k != key}}


def refuse_fitted_estimator(guider, node_name: str, family) -> None:
    """LinearAG with fitted coefficients: each step's estimate combines the previous K steps' predictions, but
    LazyCache skips whole steps (the hooks never see them), so the coefficients would combine older steps."""
    holder = holder_of(guider.model_options)
    if holder is not None and cache_kind(holder) == LAZYCACHE:
        raise adapters.node_error(
            node_name, family, "LazyCache skips whole sampling steps, so LinearAG's fitted coefficients (which "
                               "combine the predictions of the previous steps, step by step) would be applied to "
                               "predictions of other steps than they were fitted for.",
            "use estimator hold_delta or extrapolate_delta (online, no step pattern), use EasyCache instead of "
            "LazyCache, or remove LazyCache.")
    if holder is not None and cache_kind(holder) is None:
        raise _unknown(holder, node_name, family)


def refuse_recording(guider, node_name: str, family) -> None:
    """LinearAG Record fits on the model's own predictions at every step; a cache replaces some of them."""
    holder = holder_of(guider.model_options)
    if holder is None:
        return
    raise adapters.node_error(
        node_name, family, f"a step cache ({_holder_name(holder)}) is in the graph: it replaces some steps' "
                           "predictions with cached approximations (or skips the steps), so the recorded "
                           "trajectories would teach LinearAG the cache's errors.",
        "record without the cache node (bypass EasyCache/LazyCache for the recording runs); sampling with "
        "LinearAG afterwards may use the cache.")


def refuse_layout_change(guider, node_name: str, family, sigmas, adds_rows: Callable[[float], bool]) -> None:
    """For a patch that adds batch rows inside the model call on some steps only (NegToMe's reference mode adds a
    reference row per pass inside its window): refuse EasyCache when that changes between two steps on which
    EasyCache keeps or compares its per-row state (every step down to its end_percent), since it would combine
    states of different row layouts (a shape error, or a wrong image with one row)."""
    holder = holder_of(guider.model_options)
    kind = cache_kind(holder)
    if holder is None or kind == LAZYCACHE:
        return
    if kind is None:
        raise _unknown(holder, node_name, family)
    end_sigma = adapters.percent_to_sigma(guider.model_patcher, float(holder.end_percent))
    kept = [float(s) for s in sigmas[:-1] if float(s) > end_sigma]
    if len({bool(adds_rows(s)) for s in kept}) > 1:
        raise adapters.node_error(
            node_name, family, "EasyCache keeps per-row states across steps, but the reference mode adds a "
                               "reference row to the batch only inside its window, and that window ends (or "
                               "starts) while EasyCache is active, so EasyCache would combine states of different "
                               "batch layouts.",
            "use LazyCache (it caches whole steps), set EasyCache's end_percent at or before the end of NegToMe's "
            "window (window custom, end_percent), or use NegToMe (TFG) diversity mode.")


# ----------------------------------------------------------------------------------------------
# Every step (Adaptive Guidance / LinearAG)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Book:
    """Per holder (EasyCache clones its holder for every run): which step last updated each uuid's difference."""
    evaluation: int = 0
    seen: dict = field(default_factory=dict)
    """uuid -> weak reference to the cached difference last seen."""
    updated: dict = field(default_factory=dict)
    """uuid -> the evaluation (before_step call) during which its difference was last computed."""


_books: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _book(holder) -> _Book:
    book = _books.get(holder)
    if book is None:
        book = _books[holder] = _Book()
    return book


def _note_updates(holder, book: _Book) -> None:
    """Differences EasyCache replaced since the previous before_step were computed during that evaluation."""
    for uuid, diff in list(holder.uuid_cache_diffs.items()):
        ref = book.seen.get(uuid)
        if ref is None or ref() is not diff:
            book.updated[uuid] = book.evaluation - 1
            book.seen[uuid] = weakref.ref(diff)
    book.evaluation += 1


def _uuids(conds) -> list:
    return [c["uuid"] for c in conds or () if isinstance(c, dict) and c.get("uuid") is not None]


def before_step(model_options: dict, timestep, conds: list, batch: int, uncond_rows: int) -> bool:
    """Call once per evaluation (calc_cond_batch call) of Adaptive Guidance / LinearAG, before its first pass.

    `conds`: calc_cond_batch's [positive, negative] lists; `batch`: rows of x; `uncond_rows`: rows of the uncond
    pass planned for this evaluation (0: cond only; `batch`: the whole batch; fewer: the open images).
    Returns True when the uncond pass must run as its own call after the cond pass (EasyCache decides on the cond
    pass and the uncond pass follows that decision); False: no constraint (no EasyCache, or outside its range)."""
    holder = holder_of(model_options)
    if cache_kind(holder) != EASYCACHE:
        return False
    book = _book(holder)
    _note_updates(holder, book)
    if holder.is_past_end_timestep(timestep):  # EasyCache hands these calls on untouched
        return False
    if not holder.should_do_easycache(timestep):  # before its start: it computes and stores every pass
        return False
    cond_uuids = _uuids(conds[0])
    if not cond_uuids:
        return False
    if holder.initial_step:  # EasyCache's first step in its range: it would decide on the first call's first uuid
        holder.first_cond_uuid = cond_uuids[0]
        holder.initial_step = False
    decider = holder.first_cond_uuid
    if decider not in cond_uuids:
        return False  # not a run the policy set up (another hook decided first): EasyCache's own behaviour
    if uncond_rows > 0 and _may_skip(holder) and not _pair_ready(holder, book, decider, _uuids(conds[1]), batch,
                                                                uncond_rows):
        holder.skip_current_step = False
        holder.cumulative_change_rate = float("inf")  # EasyCache's own branch: "NOT skipping", then back to 0
    return uncond_rows > 0


def _may_skip(holder) -> bool:
    """EasyCache reaches its skip test on this step's deciding call (it has the estimates the test needs)."""
    return (holder.x_prev_subsampled is not None and holder.output_prev_norm is not None
            and holder.relative_transformation_rate is not None)


def _pair_ready(holder, book: _Book, decider, uncond_uuids: list, batch: int, uncond_rows: int) -> bool:
    """Every uncond uuid has a difference from the same evaluation as the cond's, for the planned rows (compared
    with the cond's rows, so that a constant row added inside the model call, as NegToMe's reference row, does
    not count as a change)."""
    diffs = holder.uuid_cache_diffs
    if decider not in diffs or not uncond_uuids:
        return False
    cond_rows = diffs[decider].shape[0]
    cond_step = book.updated.get(decider)
    for uuid in uncond_uuids:
        diff = diffs.get(uuid)
        if diff is None or book.updated.get(uuid) != cond_step:
            return False
        if diff.shape[0] - cond_rows != uncond_rows - batch:
            return False
    return True


def step_reused(model_options: dict) -> bool:
    """After the passes of an evaluation: True when EasyCache reused cached differences for it instead of running
    the model (point 4 of the policy: Adaptive Guidance latches only on computed predictions; reused cond and uncond
    predictions share EasyCache's input drift, which pulls their cosine towards 1)."""
    holder = holder_of(model_options)
    return cache_kind(holder) == EASYCACHE and bool(holder.skip_current_step)
