"""Deciding, not doing: which tiles to encode and which to step next (step-level continuous batching).

The scheduler owns no model, no tensor and no thread; it is plain bookkeeping, so every decision can be
unit-tested with hand-made results. The engine loop (`service.batcher.Batcher`) asks it and applies its
decisions, and the model runner (`service.runner.ModelRunner`) makes the calls, in the manner of vLLM v1's
`Scheduler`, `EngineCore.step` and `ModelRunner`:

    plan = scheduler.schedule(now)     # drop dead requests, admit tiles, pick one denoiser batch
    result = runner.execute(plan)      # encoder and denoiser calls
    done = scheduler.update(plan, result)

Decisions made here: the queue limit; dropping cancelled requests and requests past their deadline;
admitting new tiles into the active set, round-robin across requests, each up to a fair share of it;
choosing at most `batch_limit` active tiles of one model and tile shape (a call never mixes models; the groups
take turns, so a burst for one model never starves another), round-robin across requests (most
advanced tiles of a request first; when the requests outnumber the batch, those with the least work left
first, so that a small request is not stuck behind a large one, except that a request passed over for
`STARVE_AFTER` calls goes first); halving the
batch limit after an out-of-memory error and doubling it back after a run of successful calls; and how long
an idle worker waits for company.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from service.errors import Cancelled, DeadlineExceeded, OutOfMemory, QueueFull, ServiceError

Shape = tuple[int, int]
Group = tuple[str, Shape]  # (model id, LR tile shape)
STARVE_AFTER = 4  # denoiser calls a request with tiles ready may be passed over before it goes first


@dataclass(frozen=True)
class SchedulerConfig:
    """The batching knobs (the scheduler's decisions and the worker's)."""

    max_batch_tiles: int = 8  # most tiles in one denoiser call
    max_active_tiles: int | None = None  # most tiles encoded and being sampled; default 2 x batch
    max_wait_s: float = 0.005  # an idle worker waits this long for company before its first step
    max_queue: int = 32  # most jobs accepted at once (waiting or running)
    continuous: bool = True  # False: one job at a time (its own tiles still batched)
    reproducible: bool = True  # pad calls to a fixed batch size: output independent of co-batching
    retry_after_s: int = 2
    oom_recover_after: int = 50  # successful calls before a halved batch limit is doubled again

    def __post_init__(self) -> None:
        if self.max_batch_tiles < 1:
            raise ValueError("max_batch_tiles must be at least 1")
        if self.max_active_tiles is not None and self.max_active_tiles < self.max_batch_tiles:
            raise ValueError("max_active_tiles must be at least max_batch_tiles")
        if self.max_queue < 1 or self.max_wait_s < 0:
            raise ValueError("max_queue must be >= 1 and max_wait_s >= 0")

    @property
    def active_tiles(self) -> int:
        return self.max_active_tiles or 2 * self.max_batch_tiles


@dataclass(eq=False)
class Ticket:
    """A request as the scheduler sees it: its model, its tiles' count and shape, steps, deadline."""

    n_tiles: int
    steps: int  # 0: done once encoded, no denoiser call
    tile_shape: Shape = (0, 0)  # LR tile size; only tiles of one shape share a denoiser call
    model: str = ""  # the model's id; only tiles of one model share a call
    deadline: float | None = None  # time.monotonic() value
    submitted: float = field(default_factory=time.monotonic)
    request_id: str = ""
    cancel_reason: str | None = None
    calls: int = 0  # denoiser calls that advanced this request
    shared_calls: int = 0  # ... of which also advanced another request

    @property
    def group(self) -> Group:
        """Tiles of one group can share an encoder or denoiser call."""
        return (self.model, self.tile_shape)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the worker to drop this request at its next iteration."""
        self.cancel_reason = reason


Item = tuple[Ticket, int]  # (request, tile index)


@dataclass
class StepPlan:
    """One iteration of the worker: fail `failed`, encode `encode`, then step `step` in ONE call."""

    failed: list[tuple[Ticket, ServiceError]] = field(default_factory=list)
    encode: list[tuple[Ticket, list[int]]] = field(default_factory=list)  # consecutive indices
    encode_chunk: int = 1  # tiles per encoder call
    pad_encode: bool = False  # pad every encoder call to encode_chunk tiles (reproducible mode)
    step: list[Item] = field(default_factory=list)  # all of one group (model and tile shape)
    pad_to: int | None = None  # pad the denoiser call to this many tiles (reproducible mode)

    def __bool__(self) -> bool:
        return bool(self.failed or self.encode or self.step)


@dataclass
class StepResult:
    """What the worker did with a plan."""

    encoded: list[tuple[Ticket, list[int]]] = field(default_factory=list)
    calls: list[list[Item]] = field(default_factory=list)  # each successful denoiser call's tiles
    failed: list[tuple[Ticket, ServiceError]] = field(default_factory=list)  # encoder/denoiser errors
    encode_oom: list[tuple[Ticket, list[int]]] = field(default_factory=list)  # not encoded: out of memory
    step_oom: int = 0  # tiles in a denoiser call that ran out of memory (0: none)


@dataclass
class Outcome:
    """What `update` concluded: requests to resolve."""

    completed: list[Ticket] = field(default_factory=list)
    failed: list[tuple[Ticket, ServiceError]] = field(default_factory=list)
    batch_limit_changed: bool = False


@dataclass(eq=False)
class _State:
    next_tile: int = 0  # tiles below it were handed to the encoder
    active: dict[int, int] = field(default_factory=dict)  # tile index -> denoiser steps left
    done: int = 0
    last_call: int = -1  # number of the last denoiser call that advanced it (-1: none yet)
    waiting_since: int = 0  # number of denoiser calls recorded when it was accepted


class Scheduler:
    """The decisions of continuous batching. Not thread-safe: the worker calls it under its lock."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.batch_limit = self.config.max_batch_tiles  # lowered after an out-of-memory error
        self._ok_calls = 0
        self._state: dict[Ticket, _State] = {}  # accepted and unfinished, in arrival order
        self._last_group: Group | None = None
        self._calls = 0  # denoiser calls recorded so far

    # ------------------------------------------------------------------ the queue

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, req: Ticket) -> bool:
        return req in self._state

    @property
    def requests(self) -> list[Ticket]:
        return list(self._state)

    def add(self, req: Ticket) -> None:
        """Accept a request; QueueFull beyond `max_queue`."""
        if req.n_tiles < 1:
            raise ValueError("a request needs at least one tile")
        if len(self._state) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} requests in progress); retry later",
                            retry_after_s=self.config.retry_after_s)
        self._state[req] = _State(waiting_since=self._calls)

    def remove(self, req: Ticket) -> bool:
        """Forget a request (finished elsewhere, cancelled); False if it was not here."""
        return self._state.pop(req, None) is not None

    def active_tiles(self) -> int:
        return sum(len(s.active) for s in self._state.values())

    def pending_tiles(self) -> int:
        return sum(r.n_tiles - s.next_tile for r, s in self._state.items())

    def work_left(self) -> dict[str, int]:
        """Tile-steps not yet done, by model: tiles not yet encoded at their full steps, active ones' steps left."""
        out: dict[str, int] = defaultdict(int)
        for r, s in self._state.items():
            out[r.model] += (r.n_tiles - s.next_tile) * max(1, r.steps) + sum(s.active.values())
        return dict(out)

    def wait_s(self, now: float) -> float:
        """How long an idle worker should wait for more tiles before its first step (0: go now)."""
        if self.config.max_wait_s <= 0 or not self._state or self.active_tiles():
            return 0.0
        if self.pending_tiles() >= self.batch_limit:
            return 0.0
        first = min(r.submitted for r in self._state)
        return max(0.0, first + self.config.max_wait_s - now)

    # ------------------------------------------------------------------ deciding

    def schedule(self, now: float | None = None) -> StepPlan:
        now = time.monotonic() if now is None else now
        repro = self.config.reproducible
        plan = StepPlan(failed=self._reap(now), encode_chunk=self.encode_chunk() if repro else self.batch_limit,
                        pad_encode=repro)
        live = list(self._state)
        if not live:
            return plan
        plan.encode = self._admit(live)
        plan.step = self._select(live, {r: idx for r, idx in plan.encode})
        plan.encode = self._defer_unstepped(plan.encode, plan.step)
        plan.pad_to = self.batch_limit if self.config.reproducible else None
        return plan

    def _reap(self, now: float) -> list[tuple[Ticket, ServiceError]]:
        """Cancelled requests and those past their deadline, removed."""
        dead: list[tuple[Ticket, ServiceError]] = []
        for req, s in list(self._state.items()):
            if req.cancel_reason is not None:
                dead.append((req, Cancelled(req.cancel_reason)))
            elif req.deadline is not None and now > req.deadline:
                dead.append((req, DeadlineExceeded(
                    f"the request's deadline passed before it finished ({s.done} of {req.n_tiles} tiles done)")))
        for req, _ in dead:
            del self._state[req]
        return dead

    def encode_chunk(self) -> int:
        """Tiles per encoder call in reproducible mode, where each call is padded to it: an eighth of the batch
        limit (one tile up to a batch of 15). An encoder call costs more per tile than a denoiser step, so padding
        a small request's encoder call to the whole batch would cost more than its denoiser call, while calls of
        one tile each leave an accelerator waiting on their launch overhead."""
        return max(1, self.batch_limit // 8)

    def active_limit(self) -> int:
        """Size of the active set; it shrinks with the batch limit after an out-of-memory error."""
        cfg = self.config
        return max(1, cfg.active_tiles * self.batch_limit // cfg.max_batch_tiles)

    def _admit(self, live: list[Ticket]) -> list[tuple[Ticket, list[int]]]:
        """New tiles to encode: round-robin over requests (those of the models with the fewest active tiles first),
        each up to its fair share of the active set."""
        if self.config.continuous:
            active = self.active_limit()
            # Models with fewer tiles in the active set first (arrival order within a model): a burst of requests
            # for one model fills the active set, and a request for another would wait for all of it.
            held: dict[str, int] = defaultdict(int)
            for r in live:
                held[r.model] += len(self._state[r].active)
            candidates = sorted(live, key=lambda r: held[r.model])
            cap = min(self.batch_limit, max(1, active // len(live)))
            free = active - self.active_tiles()
        else:  # one request at a time, in arrival order
            candidates = live[:1]
            cap = self.batch_limit
            free = cap - len(self._state[live[0]].active)
        chosen: dict[Ticket, list[int]] = defaultdict(list)
        progress = True
        while free > 0 and progress:
            progress = False
            for req in candidates:
                s = self._state[req]
                if free > 0 and s.next_tile < req.n_tiles and len(s.active) + len(chosen[req]) < cap:
                    chosen[req].append(s.next_tile)
                    s.next_tile += 1
                    free -= 1
                    progress = True
        return [(req, idx) for req, idx in chosen.items() if idx]

    def _defer_unstepped(self, admitted: list[tuple[Ticket, list[int]]],
                         step: list[Item]) -> list[tuple[Ticket, list[int]]]:
        """Tiles admitted for a request that gets no tile in this call go back to a later plan: encoding them
        now would only delay the requests that are stepped (at one tile per call, a small request arriving
        beside a large one waited for the large one's next encoder call). Requests with steps=0 keep theirs:
        encoding is all their work."""
        stepped = {req for req, _ in step}
        kept = []
        for req, idx in admitted:
            if req.steps > 0 and req not in stepped:
                self._state[req].next_tile = idx[0]
            else:
                kept.append((req, idx))
        return kept

    def _select(self, live: list[Ticket], admitted: dict[Ticket, list[int]]) -> list[Item]:
        """Up to batch_limit active tiles of one group (model and shape), round-robin over requests, most
        advanced first; the groups take turns call by call. Tiles admitted in this plan count as active (a
        request with steps=0 never is)."""
        reqs = live if self.config.continuous else live[:1]
        queues: list[tuple[Group, list[Item]]] = []
        for req in reqs:
            left = dict(self._state[req].active)
            if req.steps > 0:
                left.update((i, req.steps) for i in admitted.get(req, ()))
            if left:
                order = sorted(left, key=lambda i: (left[i], i))
                queues.append((req.group, [(req, i) for i in order]))
        if not queues:
            return []
        groups = list(dict.fromkeys(group for group, _ in queues))
        group = groups[0]
        if len(groups) > 1 and self._last_group in groups:  # take turns between groups
            group = groups[(groups.index(self._last_group) + 1) % len(groups)]
        self._last_group = group
        lists = [q for g, q in queues if g == group]
        if len(lists) > self.batch_limit:  # not every request fits: least work left first, unless starved
            lists.sort(key=self._priority)
        batch: list[Item] = []
        depth = 0
        while len(batch) < self.batch_limit and any(depth < len(q) for q in lists):
            for q in lists:
                if depth < len(q) and len(batch) < self.batch_limit:
                    batch.append(q[depth])
            depth += 1
        return batch

    def _priority(self, queue: list[Item]) -> tuple[int, int, int]:
        """Sort key of a request's queue of ready tiles: starved first, then least tile-steps left."""
        req = queue[0][0]
        s = self._state[req]
        starved = self._calls - max(s.last_call, s.waiting_since) >= STARVE_AFTER
        left = sum(s.active.values()) + (req.n_tiles - s.next_tile) * req.steps
        return (0 if starved else 1, left, s.last_call)

    # ------------------------------------------------------------------ recording

    def update(self, plan: StepPlan, result: StepResult) -> Outcome:
        """Record what ran; returns the requests that completed or failed (removed from the queue)."""
        out = Outcome()
        failed: dict[Ticket, ServiceError] = {}
        for req, err in result.failed:
            failed.setdefault(req, err)
        for req, idx in result.encode_oom:
            s = self._state.get(req)
            if s is None or req in failed:
                continue
            s.next_tile = min(s.next_tile, idx[0])  # give the tiles back; nothing was started
            if not self._halve(len(idx)):
                failed[req] = OutOfMemory("out of accelerator memory encoding this image", self.config.retry_after_s)
            else:
                out.batch_limit_changed = True
        for req, idx in result.encoded:
            s = self._state.get(req)
            if s is None or req in failed:
                continue
            if req.steps == 0:
                s.done += len(idx)
            else:
                s.active.update((i, req.steps) for i in idx)
        if result.step_oom:
            if self._halve(result.step_oom):
                out.batch_limit_changed = True
            elif plan.step:
                failed.setdefault(plan.step[0][0], OutOfMemory(
                    "out of accelerator memory with a batch of one tile", self.config.retry_after_s))
        for call in result.calls:
            reqs = list(dict.fromkeys(req for req, _ in call))
            self._calls += 1
            for req in reqs:
                req.calls += 1
                req.shared_calls += len(reqs) > 1
                if req in self._state:
                    self._state[req].last_call = self._calls
            for req, i in call:
                s = self._state.get(req)
                if s is None or i not in s.active:
                    continue
                s.active[i] -= 1
                if s.active[i] <= 0:
                    del s.active[i]
                    s.done += 1
        if result.calls and not result.step_oom:
            self._ok_calls += 1
            if self.batch_limit < self.config.max_batch_tiles and self._ok_calls >= self.config.oom_recover_after:
                self.batch_limit = min(self.config.max_batch_tiles, self.batch_limit * 2)
                self._ok_calls = 0
                out.batch_limit_changed = True
        for req, err in failed.items():
            if self.remove(req):
                out.failed.append((req, err))
        for req, s in list(self._state.items()):
            if s.done >= req.n_tiles:
                del self._state[req]
                out.completed.append(req)
        return out

    def _halve(self, n: int) -> bool:
        """Halve the batch limit after an OOM with `n` tiles; False when it cannot shrink any more."""
        limit = max(1, min(self.batch_limit, n) // 2)
        if limit >= self.batch_limit:
            return False
        self.batch_limit = limit
        self._ok_calls = 0
        return True
