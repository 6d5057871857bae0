"""transformers' continuous batching on a patched model: every request in its own regime.

Stock continuous batching packs the scheduled requests into one row and picks the short or long
factors from that row's largest position, so a request's output depends on what else is scheduled
with it. Here a request behaves exactly as it would alone through the patched ``generate()``
(DESIGN §4, docs/serving.md):

- **regime at admission**: when the scheduler admits a request, its regime is fixed from its own
  prompt (long iff the prompt is longer than original_max_position_embeddings) and kept on the
  request (``_longrope_long``), never read from one prefill chunk's positions or from neighbours;
  each step hands the scheduled requests' regimes to the attention (paged.py);
- **crossing**: a short request whose next token would pass the switch is put back as a new prompt
  (its prompt plus what it generated, same id, logprobs kept: transformers' own soft reset) and
  re-prefilled once under the long factors, alone, in the same steps in which the others go on
  decoding;
- **block sharing by regime**: the paged cache reuses the pages of a common prefix; the keys of a
  long request's pages are hashed in a space of their own (token t -> -1 - t), so pages never pass
  between regimes (short requests still share a system prompt with each other, long ones too);
- **admission check**: a request whose prompt plus max_new_tokens exceeds max_position_embeddings is
  refused (ValueError) before it runs; through ``add_requests`` / ``generate_batch`` it comes back as
  a failed output and the others run;
- **failure isolation**: a step that raises fails no one at once: its requests are put back and each
  runs its next step alone, so the one that fails alone is the culprit and fails with the error.

patch_model installs this (:func:`install`) as an instance attribute ``init_continuous_batching``,
the entry point of ``generate_batch``, ``continuous_batching_context_manager`` and ``transformers
serve --continuous-batching``. The regime logic is a scheduler mixed into transformers' FIFO and
prefill-first schedulers, registered (when a patched model first starts continuous batching) as
``longrope_fifo`` / ``longrope_prefill_first`` in transformers' scheduler table, the extension
point ``ContinuousBatchingConfig.scheduler_type`` names. Batching runs synchronously (the crossing
needs each step's tokens before the next step is scheduled).

Besides that table, this uses transformers internals that are not public API, tested with
transformers 5.5, 5.17 and 5.25 (:data:`TESTED_TRANSFORMERS`): ``RequestState`` and its
``create_equivalent_initial_request``; a scheduler's ``active_requests``, ``waiting_requests``,
``waiting_requests_order``, ``add_waiting_request``; the paged cache's ``free_blocks``,
``search_prefix_match`` and ``mark_complete_blocks`` (``mark_shareable_blocks_as_complete`` before
5.25); the manager's ``_generation_step``, ``output_router``, ``batch_processor`` and its
``inputs_and_outputs.requests_in_batch``. :func:`_check_transformers` refuses a release that lacks
them, naming them, and warns on one newer than the newest tested.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import types
import warnings
import weakref
from collections import deque
from typing import Callable, Optional

from .paged import attach_regime_buffer, write_regimes

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ("5.5", "5.17", "5.25")
_OLDEST, _NEWEST = (5, 5), (5, 25)

_LONG_ATTR = "_longrope_long"  # on a RequestState: its regime, request metadata fixed at admission
_STRIKES_ATTR = "_longrope_strikes"  # on a RequestState: failed steps it shared since it last ran alone
_MAX_STRIKES = 3  # a request in more failed shared steps than this (never run alone in between) fails
_BATCHING_ATTR = "_longrope_batching"  # on a manager: the _Batching whose hooks it carries
_PREFIX = "longrope_"
_SCHEDULERS = ("fifo", "prefill_first")
_COMPLETION_METHODS = ("mark_complete_blocks", "mark_shareable_blocks_as_complete")  # 5.25 / <= 5.17

# id(model config) -> _Batching of the patched model: a scheduler finds its model's rules through
# the config its paged cache holds. Weak values: an entry lives as long as its patch.
_BATCHING = weakref.WeakValueDictionary()


# ---------------------------------------------------------------------------- the rules of one patched model
class _Batching:
    """The regime rules of one patched model, shared by its scheduler and its manager hooks. Reads
    the patch state at every use: set_rope may change its config while a manager lives."""

    def __init__(self, state, config):
        self.state = state
        self.config = config  # kept alive while registered, so its id names no other config

    @property
    def original_max(self) -> int:
        return self.state.cfg.original_max_position_embeddings

    def admit(self, request) -> bool:
        """The request's regime, fixed the first time it is asked (at admission): long iff its whole
        prompt is longer than the switch (or the patch runs the long factors throughout). A request
        put back after a crossing holds prompt + generated tokens, so it is long from then on."""
        long = getattr(request, _LONG_ATTR, None)
        if long is None:
            long = self.state.regime == "long" or len(request.initial_tokens) > self.original_max
            setattr(request, _LONG_ATTR, long)
        return long

    def crosses(self, request) -> bool:
        """A short request whose next forward would run past the switch (its cached tokens plus the
        token it feeds next), as generate() alone switches when max(position) + 1 > original_max."""
        from transformers.generation.continuous_batching import RequestStatus

        return (request.status == RequestStatus.DECODING and not self.admit(request)
                and request.position_offset + len(request.tokens_to_process) > self.original_max)


def admission_error(cfg, prompt: int, max_new_tokens: Optional[int]) -> Optional[str]:
    """Why a request cannot run under ``cfg`` (its prompt plus max_new_tokens past max_position_embeddings),
    or None. Without a token limit it needs room for one token; past the positions it fails when it gets there."""
    limit = cfg.max_position_embeddings
    if prompt + (1 if max_new_tokens is None else max_new_tokens) <= limit:
        return None
    return (f"the prompt ({prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceed max_position_embeddings "
            f"({limit}) of this LongRoPE model")


# ---------------------------------------------------------------------------- the scheduler
class _RegimeScheduling:
    """Mixed into transformers' schedulers: the regime of each request at admission, the crossing,
    regime-keyed block sharing, suspects of a failed step run alone, and the regimes of each
    scheduled batch written for the attention (paged.write_regimes)."""

    def __init__(self, cache, *args, **kwargs):
        super().__init__(cache, *args, **kwargs)
        self._longrope = _batching_of(cache)
        # one entry per packed sequence a step can hold (never more than its tokens)
        attach_regime_buffer(cache, cache.max_batch_tokens)
        if cache.use_prefix_sharing:
            _key_block_sharing(cache, self, self._longrope)

    def add_waiting_request(self, state):
        self._longrope.admit(state)
        super().add_waiting_request(state)

    def schedule_batch(self, token_budget, cache_budget):
        for request in [r for r in self.active_requests.values() if self._longrope.crosses(r)]:
            _requeue(self, request, self._longrope)
        scheduled = self._schedule_suspect_alone(token_budget, cache_budget)
        if scheduled is None:
            scheduled = super().schedule_batch(token_budget, cache_budget)
        if scheduled[0]:
            write_regimes(self.cache, [self._longrope.admit(future.state) for future in scheduled[0]])
        return scheduled

    def _schedule_suspect_alone(self, token_budget, cache_budget):
        """After a failed step (_isolate_failed_step) its requests wait, marked: the first runs its next
        step alone (scheduled by the base class over a queue of one). None when there is no suspect,
        or it cannot run now (it then waits its turn among the others)."""
        suspect = next((self.waiting_requests[r] for r in self.waiting_requests_order
                        if getattr(self.waiting_requests[r], _STRIKES_ATTR, 0)), None)
        if suspect is None:
            return None
        rid = suspect.request_id
        kept = self.active_requests, self.waiting_requests, self.waiting_requests_order
        self.active_requests, self.waiting_requests, self.waiting_requests_order = {}, {rid: suspect}, deque([rid])
        try:
            scheduled = super().schedule_batch(token_budget, cache_budget)
        finally:
            admitted = self.active_requests
            self.active_requests, self.waiting_requests, self.waiting_requests_order = kept
            self.active_requests.update(admitted)
            if rid in admitted:
                self.waiting_requests.pop(rid, None)
                self.waiting_requests_order.remove(rid)
        return scheduled if scheduled[0] else None


def _batching_of(cache) -> _Batching:
    batching = _BATCHING.get(id(cache.config))
    if batching is None:
        raise ValueError("the longrope_* schedulers run the continuous batching of a model patched by "
                         "longrope_triton.patch_model (its init_continuous_batching selects them)")
    return batching


@functools.lru_cache(maxsize=None)
def _register_schedulers() -> None:
    """Register the regime schedulers (transformers' FIFO and prefill-first ones with the mixin) in
    transformers' scheduler table as longrope_<name>: once, the first time a patched model starts
    continuous batching (nothing is registered at import)."""
    from transformers.generation.continuous_batching import FIFOScheduler, PrefillFirstScheduler
    from transformers.generation.continuous_batching import scheduler as module

    for name, base in zip(_SCHEDULERS, (FIFOScheduler, PrefillFirstScheduler)):
        scheduler = type(f"LongRoPE{base.__name__}", (_RegimeScheduling, base), {"__module__": __name__})
        module.SCHEDULER_MAPPING.setdefault(_PREFIX + name, scheduler)


def _requeue(scheduler, request, batching: _Batching, strikes: int = 0):
    """Put a request back, first among the waiting, as a new prompt: its prompt plus generated tokens,
    same id, max_new_tokens reduced, logprobs and output kept (transformers' soft reset, which its CPU
    offloading uses); its cache pages are freed. Its regime is that of its whole length."""
    rid = request.request_id
    scheduler.cache.free_blocks(rid)
    scheduler.active_requests.pop(rid, None)
    fresh = request.create_equivalent_initial_request()
    fresh.created_time = request.created_time
    if _output_mutates_request():
        fresh.to_generation_output = types.MethodType(_pure_generation_output, fresh)
    batching.admit(fresh)
    if strikes:
        setattr(fresh, _STRIKES_ATTR, strikes)
    scheduler.waiting_requests[rid] = fresh
    scheduler.waiting_requests_order.appendleft(rid)


# ---------------------------------------------------------------------------- block sharing keyed by regime
class _LongKeyed:
    """What the cache's block-completion method reads of a request, with its tokens in the long
    regime's hash space."""

    __slots__ = ("request_id", "status", "initial_tokens", "generated_tokens")

    def __init__(self, request):
        self.request_id, self.status = request.request_id, request.status
        self.initial_tokens = _long_keys(request.initial_tokens)
        self.generated_tokens = _long_keys(request.generated_tokens)


def _long_keys(tokens: list) -> list:
    """Token ids of a long-regime request as the block hashes see them: -1 - t, never a real token."""
    return [-1 - t for t in tokens]


def _key_block_sharing(cache, scheduler, batching: _Batching) -> None:
    """Wrap the cache's prefix lookup and block registration (on this instance): a long request's
    pages hash its tokens as _long_keys, so no page is found or deduplicated across regimes."""
    search = cache.search_prefix_match

    def search_prefix_match(request_id, prompt_ids):
        request = scheduler.waiting_requests.get(request_id) or scheduler.active_requests.get(request_id)
        if request is None:  # not one of ours: share nothing rather than guess its regime
            return 0
        return search(request_id, _long_keys(prompt_ids) if batching.admit(request) else prompt_ids)

    name = next(m for m in _COMPLETION_METHODS if hasattr(cache, m))
    complete = getattr(cache, name)

    def complete_blocks(request, blocks):
        return complete(_LongKeyed(request) if batching.admit(request) else request, blocks)

    cache.search_prefix_match = search_prefix_match
    setattr(cache, name, complete_blocks)


def _keyed_sharing_supported() -> bool:
    """The installed paged cache has the two methods _key_block_sharing wraps."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    return (hasattr(PagedAttentionCache, "search_prefix_match")
            and any(hasattr(PagedAttentionCache, m) for m in _COMPLETION_METHODS))


# ---------------------------------------------------------------------------- outputs
@functools.lru_cache(maxsize=None)
def _output_mutates_request() -> bool:
    """transformers 5.5's RequestState.to_generation_output moves a put-back request's earlier tokens
    from its prompt to its generated tokens, in place: a streamed request then counts them against
    its reduced max_new_tokens and stops early. Decided by trying it, not by version."""
    from transformers.generation.continuous_batching import RequestState

    probe = RequestState(request_id="probe", initial_tokens=[1, 2])
    probe._true_initial_tokens = 1
    probe.to_generation_output()
    return probe.initial_tokens != [1, 2]


def _pure_generation_output(request):
    """to_generation_output as transformers >= 5.17 computes it, leaving the request as it is."""
    from transformers.generation.continuous_batching.requests import GenerationOutput

    split = request._true_initial_tokens
    return GenerationOutput(request_id=request.request_id, prompt_ids=request.initial_tokens[:split],
                            generated_tokens=request.initial_tokens[split:] + request.generated_tokens,
                            logprobs=request.logprobs[:], error=request.error, status=request.status,
                            created_time=request.created_time, lifespan=request.lifespan,
                            timestamps=request.timestamps)


def _deliver_failure(manager, request, message: str) -> None:
    """Fail one request and deliver its output (what it generated, and the error) to its caller."""
    from transformers.generation.continuous_batching import RequestStatus

    request.status = RequestStatus.FAILED
    request.error = message
    output = request.to_generation_output()
    if not output.is_finished():  # transformers 5.5: only FINISHED ends a request; generate_batch waits for it
        output.status = RequestStatus.FINISHED
    manager.output_router.deliver(output)


# ---------------------------------------------------------------------------- manager hooks
def _hook_manager(manager, batching: _Batching) -> None:
    """Admission check on add_request / add_requests, failure isolation around each step (on the instance)."""
    setattr(manager, _BATCHING_ATTR, batching)
    add_request, add_requests, step = manager.add_request, manager.add_requests, manager._generation_step
    delivering = threading.local()  # set while add_requests runs: reject by a failed output, not by raising

    @functools.wraps(add_request)
    def checked_add_request(input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
        limit = manager.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        error = admission_error(batching.state.cfg, len(input_ids), limit)
        if error is None:
            return add_request(input_ids, request_id, max_new_tokens, *args, **kwargs)
        if not getattr(delivering, "on", False) or request_id is None:
            raise ValueError(error)
        from transformers.generation.continuous_batching import RequestState

        _deliver_failure(manager, RequestState(request_id=request_id, initial_tokens=list(input_ids)),
                         f"ValueError: {error}")
        return request_id

    @functools.wraps(add_requests)
    def add_requests_rejecting_each(*args, **kwargs):
        delivering.on = True
        try:
            return add_requests(*args, **kwargs)
        finally:
            delivering.on = False

    def isolating_step():
        try:
            step()
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the batch
            _isolate_failed_step(manager, batching, error)
        else:
            _clear_strikes(manager)

    manager.add_request = checked_add_request
    manager.add_requests = add_requests_rejecting_each
    manager._generation_step = isolating_step


def _isolate_failed_step(manager, batching: _Batching, error: Exception) -> None:
    """A step raised: nothing of it is applied (its update finds an empty batch). A request that ran it
    alone, or shared too many failed steps, fails with the error; the others are put back to run
    their next step alone (the scheduler's suspects) and go on from there."""
    processor = manager.batch_processor
    io = processor.inputs_and_outputs
    batch = [future.state for future in io.requests_in_batch]
    io.requests_in_batch = []
    if hasattr(io, "num_request_in_batch"):  # transformers >= 5.17 counts the batch's outputs by it
        io.num_request_in_batch = 0
    logger.warning("longrope_triton: a continuous-batching step of %d requests failed (%s: %s); %s",
                   len(batch), type(error).__name__, error,
                   "failing it" if len(batch) == 1 else "running each of them alone to find the culprit")
    for request in batch:
        strikes = getattr(request, _STRIKES_ATTR, 0) + 1
        if len(batch) == 1 or strikes > _MAX_STRIKES:
            processor.scheduler.finish_request(request.request_id)
            _deliver_failure(manager, request, f"{type(error).__name__}: {error}")
        else:
            _requeue(processor.scheduler, request, batching, strikes)


def _clear_strikes(manager) -> None:
    """A suspect that ran its step alone without failing is innocent again."""
    batch = manager.batch_processor.inputs_and_outputs.requests_in_batch
    if len(batch) == 1:
        setattr(batch[0].state, _STRIKES_ATTR, 0)


# ---------------------------------------------------------------------------- versions
def _missing_internals() -> list:
    """The transformers internals this module uses that the installed release lacks (by name)."""
    from transformers.generation.continuous_batching import (ContinuousBatchingManager, PagedAttentionCache,
                                                             RequestState, Scheduler)
    from transformers.generation.continuous_batching import scheduler as module

    needed = [(RequestState, "create_equivalent_initial_request"), (RequestState, "to_generation_output"),
              (Scheduler, "add_waiting_request"), (Scheduler, "schedule_batch"), (Scheduler, "finish_request"),
              (module, "SCHEDULER_MAPPING"), (PagedAttentionCache, "free_blocks"), (PagedAttentionCache, "update"),
              (ContinuousBatchingManager, "_generation_step"), (ContinuousBatchingManager, "add_request"),
              (ContinuousBatchingManager, "add_requests")]
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]


@functools.lru_cache(maxsize=None)
def _check_transformers() -> None:
    """Refuse a transformers release without what this module uses; warn (once) on one newer than tested."""
    import transformers
    from packaging.version import Version

    version = Version(transformers.__version__).release[:2]
    tested = ", ".join(TESTED_TRANSFORMERS)
    if version < _OLDEST:
        raise RuntimeError(f"continuous batching of a patched model needs transformers >= 5.5 (tested: {tested}), "
                           f"found {transformers.__version__}")
    missing = _missing_internals()
    if missing:
        raise RuntimeError(f"continuous batching of a patched model uses transformers internals that "
                           f"transformers {transformers.__version__} lacks: {', '.join(missing)} (tested: {tested})")
    if version > _NEWEST:
        warnings.warn(f"longrope_triton: continuous batching of a patched model uses transformers internals tested "
                      f"with transformers {tested}; {transformers.__version__} is newer (docs/serving.md lists them)",
                      RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------- install
def _regime_config(continuous_batching_config, generation_config, deprecated: dict):
    """A copy of the caller's ContinuousBatchingConfig (or of the one transformers would use) with the
    regime scheduler, synchronous batching and, where the cache methods are not found, no block sharing."""
    from transformers import ContinuousBatchingConfig

    config = continuous_batching_config
    if config is None:
        given = getattr(generation_config, "continuous_batching_config", None)
        config = given if isinstance(given, ContinuousBatchingConfig) else ContinuousBatchingConfig()
    config = copy.deepcopy(config)
    if config.use_async_batching or deprecated.get("use_async_batching"):
        raise ValueError("a patched LongRoPE model batches synchronously: a request crossing the short/long switch "
                         "is re-prefilled before the next step is scheduled, which needs each step's tokens first. "
                         "Leave use_async_batching unset or False")
    config.use_async_batching = False
    kind = config.scheduler_type
    if not kind.startswith(_PREFIX):
        if kind not in _SCHEDULERS:
            raise ValueError(f"scheduler_type {kind!r}: a patched LongRoPE model runs one of {list(_SCHEDULERS)} "
                             f"with its per-request regimes")
        config.scheduler_type = _PREFIX + kind
    _register_schedulers()
    if config.allow_block_sharing and not _keyed_sharing_supported():
        warnings.warn("longrope_triton: this transformers release has no prefix-lookup / block-completion methods to "
                      "key block sharing by regime; block sharing is off", RuntimeWarning, stacklevel=3)
        config.allow_block_sharing = False
    return config


def install(model, state) -> Optional[Callable[[], None]]:
    """Make ``model.init_continuous_batching`` (and so generate_batch, the batching context manager and
    transformers serve) run per-request regimes. Returns the undo function, or None when the installed
    transformers has no continuous batching."""
    original = getattr(model, "init_continuous_batching", None)
    if original is None:
        return None
    batching = _Batching(state, model.config)
    configs = {id(model.config), id(model.config.get_text_config())}  # the paged cache holds one of them
    for key in configs:
        _BATCHING[key] = batching
    previous = model.__dict__.get("init_continuous_batching")

    @functools.wraps(original)
    def init_continuous_batching(generation_config=None, continuous_batching_config=None, **kwargs):
        _check_transformers()
        if state.process_group is not None:
            raise ValueError("a context-parallel patched model (process_group) runs whole sequences without a KV "
                             "cache: it cannot batch requests")
        config = _regime_config(continuous_batching_config, generation_config or model.generation_config, kwargs)
        kwargs.pop("use_async_batching", None)
        manager = original(generation_config, config, **kwargs)
        if getattr(manager, _BATCHING_ATTR, None) is None:  # a persistent manager comes back hooked
            _hook_manager(manager, batching)
        return manager

    model.init_continuous_batching = init_continuous_batching

    def uninstall() -> None:
        if previous is None:
            model.__dict__.pop("init_continuous_batching", None)
        else:
            model.init_continuous_batching = previous
        cached = getattr(model, "_cached_continuous_batching_manager", None)
        if cached is not None and getattr(cached, _BATCHING_ATTR, None) is batching:
            model.destroy_cached_continuous_batching_manager()
        for key in configs:
            if _BATCHING.get(key) is batching:  # a model patched later under the same config keeps its entry
                del _BATCHING[key]

    return uninstall
