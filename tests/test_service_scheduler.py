"""The scheduler alone: plain unit tests with hand-made results (no thread, no model, no tensor)."""

from __future__ import annotations

import pytest

from service.errors import Cancelled, DeadlineExceeded, OutOfMemory, QueueFull, WorkerError
from service.scheduler import STARVE_AFTER, Scheduler, SchedulerConfig, StepPlan, StepResult, Ticket

NOW = 1000.0


def make(**kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"max_batch_tiles": 4, "max_wait_s": 0.0, **kw}))


def req(n: int, steps: int = 2, shape: tuple[int, int] = (16, 16), **kw) -> Ticket:
    return Ticket(n_tiles=n, steps=steps, tile_shape=shape, submitted=NOW, **kw)


def ran(plan: StepPlan) -> StepResult:
    """Everything in the plan ran fine."""
    return StepResult(encoded=list(plan.encode), calls=[list(plan.step)] if plan.step else [])


def tick(s: Scheduler, now: float = NOW):
    plan = s.schedule(now)
    return plan, s.update(plan, ran(plan))


def test_admission_gives_each_request_a_fair_share_of_the_active_set():
    s = make(max_active_tiles=8)
    a, b = req(40), req(40)
    s.add(a)
    s.add(b)
    plan = s.schedule(NOW)
    assert plan.encode == [(a, [0, 1, 2, 3]), (b, [0, 1, 2, 3])]  # 8 // 2 each, indices in order
    assert plan.encode_chunk == 1 and plan.pad_to == 4  # reproducible: one tile per encode, padded calls
    s.update(plan, ran(plan))
    assert s.active_tiles() == 8
    assert s.schedule(NOW).encode == []  # the active set is full
    c = req(1)
    s.add(c)
    plan = s.schedule(NOW)
    assert plan.encode == []  # c waits until a slot frees up...
    s.update(plan, ran(plan))  # ... the 4 tiles in this call are at their last step
    plan = s.schedule(NOW)
    assert (c, [0]) in plan.encode


def test_one_request_alone_uses_at_most_a_batch_of_active_tiles():
    s = make(max_active_tiles=16)
    s.add(r := req(40))
    plan = s.schedule(NOW)
    assert plan.encode == [(r, [0, 1, 2, 3])]
    assert plan.step == [(r, i) for i in range(4)]  # tiles admitted now join this call


def test_round_robin_batch_across_requests_most_advanced_tiles_first():
    s = make(max_active_tiles=8)
    big = req(12, steps=8)
    s.add(big)
    tick(s)  # big: tiles 0-3 one step in
    small = req(1, steps=2)
    s.add(small)
    plan = s.schedule(NOW)
    assert plan.encode == [(small, [0])]  # a late request is admitted at once...
    assert plan.step == [(big, 0), (small, 0), (big, 1), (big, 2)]  # ... and joins the next call
    s.update(plan, ran(plan))
    plan, out = tick(s)
    assert (small, 0) in plan.step and out.completed == [small]
    assert small.calls == 2 and small.shared_calls == 2 and big.calls == 3


def test_a_request_left_out_of_the_call_is_not_encoded_in_it():
    """One tile per call: a small request arriving beside a large one is encoded and stepped in the next plan,
    and the large one's next tile waits for the plan after (it once delayed the small one by an encoder call)."""
    s = make(max_batch_tiles=1)
    big = req(16, steps=1)
    s.add(big)
    tick(s)  # big: tile 0 done
    small = req(1, steps=1)
    s.add(small)
    plan, out = tick(s)
    assert plan.encode == [(small, [0])] and plan.step == [(small, 0)] and out.completed == [small]
    plan, _ = tick(s)
    assert plan.encode == [(big, [1])] and plan.step == [(big, 1)]  # the deferred tile, not skipped


def test_steps_zero_completes_after_encoding_without_a_denoiser_call():
    s = make()
    s.add(r := req(3, steps=0))
    plan = s.schedule(NOW)
    assert plan.encode == [(r, [0, 1, 2])] and plan.step == []
    out = s.update(plan, ran(plan))
    assert out.completed == [r] and r.calls == 0 and len(s) == 0


def test_a_request_completes_when_every_tile_ran_all_its_steps():
    s = make()
    s.add(r := req(6, steps=3))
    completed, ticks = [], 0
    while not completed:
        _, out = tick(s)
        completed, ticks = out.completed, ticks + 1
    assert completed == [r] and ticks == 6 and r.calls == 6  # 4 tiles then 2, 3 steps each
    assert s.active_tiles() == 0 and len(s) == 0


def test_tiles_of_different_shapes_never_share_a_call_and_take_turns():
    s = make()
    a, b = req(2, steps=4, shape=(16, 16)), req(2, steps=4, shape=(2, 64))
    s.add(a)
    s.add(b)
    shapes = []
    for _ in range(4):
        plan, _ = tick(s)
        assert len({r.tile_shape for r, _ in plan.step}) == 1
        shapes.append(plan.step[0][0].tile_shape)
    assert shapes == [(16, 16), (2, 64), (16, 16), (2, 64)]


def test_one_request_at_a_time_when_not_continuous():
    s = make(continuous=False)
    a, b = req(6), req(1)
    s.add(a)
    s.add(b)
    plan = s.schedule(NOW)
    assert plan.encode == [(a, [0, 1, 2, 3])] and {r for r, _ in plan.step} == {a}


def test_queue_limit():
    s = make(max_queue=2, retry_after_s=7)
    s.add(req(1))
    s.add(req(1))
    with pytest.raises(QueueFull) as err:
        s.add(req(1))
    assert err.value.headers["Retry-After"] == "7"


def test_deadline_and_cancellation_drop_requests_at_the_next_plan():
    s = make()
    late, gone, ok = req(4, steps=5, deadline=NOW + 1), req(2, steps=5), req(1, steps=5)
    for r in (late, gone, ok):
        s.add(r)
    tick(s)
    gone.cancel("client disconnected")
    plan = s.schedule(NOW + 2)
    failed = dict(plan.failed)
    assert isinstance(failed[gone], Cancelled) and "client disconnected" in str(failed[gone])
    assert isinstance(failed[late], DeadlineExceeded) and "0 of 4 tiles done" in str(failed[late])
    assert s.requests == [ok] and {r for r, _ in plan.step} == {ok}
    assert s.active_tiles() == 1  # the dropped requests' tiles left the active set


def test_a_request_removed_while_its_plan_runs_is_ignored_by_update():
    s = make()
    s.add(r := req(2, steps=1))
    plan = s.schedule(NOW)
    assert s.remove(r)  # cancelled from another thread meanwhile
    out = s.update(plan, ran(plan))
    assert out.completed == [] and out.failed == [] and len(s) == 0


def test_errors_fail_only_the_affected_request():
    s = make()
    a, b = req(2), req(2)
    s.add(a)
    s.add(b)
    plan = s.schedule(NOW)
    err = WorkerError("encoder failed")
    result = StepResult(encoded=[(b, [0, 1])], failed=[(a, err)], calls=[[(b, 0), (b, 1)]])
    out = s.update(plan, result)
    assert out.failed == [(a, err)] and s.requests == [b]


def test_out_of_memory_in_a_step_halves_the_batch_and_shrinks_the_active_set():
    s = make(max_active_tiles=8)
    s.add(r := req(8, steps=3))
    plan = s.schedule(NOW)
    assert len(plan.step) == 4
    out = s.update(plan, StepResult(encoded=list(plan.encode), step_oom=4))
    assert out.batch_limit_changed and out.failed == []
    assert s.batch_limit == 2 and s.active_limit() == 4
    plan = s.schedule(NOW)
    assert len(plan.step) == 2 and plan.pad_to == 2  # the same tiles, retried two at a time
    assert r.calls == 0


def test_reproducible_encoder_calls_are_an_eighth_of_the_batch():
    s = make(max_batch_tiles=128)
    s.add(req(40))
    plan = s.schedule(NOW)
    assert (plan.encode_chunk, plan.pad_encode, plan.pad_to) == (16, True, 128)
    s.batch_limit = 64  # as after an out-of-memory error
    assert s.encode_chunk() == 8
    s = make(max_batch_tiles=128, reproducible=False)
    s.add(req(40))
    plan = s.schedule(NOW)
    assert (plan.encode_chunk, plan.pad_encode, plan.pad_to) == (128, False, None)


def test_out_of_memory_with_one_tile_fails_the_request():
    s = make(max_batch_tiles=1)
    a, b = req(1), req(1)
    s.add(a)
    s.add(b)
    plan = s.schedule(NOW)
    out = s.update(plan, StepResult(encoded=list(plan.encode), step_oom=1))
    ((failed, err),) = out.failed
    assert failed is plan.step[0][0] and isinstance(err, OutOfMemory)
    assert err.headers["Retry-After"] == "2" and len(s) == 1


def test_out_of_memory_while_encoding_gives_the_tiles_back():
    s = make()
    s.add(r := req(4))
    plan = s.schedule(NOW)
    out = s.update(plan, StepResult(encode_oom=[(r, [0, 1, 2, 3])]))
    assert s.batch_limit == 2 and out.failed == [] and s.active_tiles() == 0
    assert s.schedule(NOW).encode == [(r, [0, 1])]  # admitted again, fewer at a time
    s2 = make(max_batch_tiles=1)
    s2.add(r2 := req(1))
    out = s2.update(s2.schedule(NOW), StepResult(encode_oom=[(r2, [0])]))
    assert [f for f, _ in out.failed] == [r2] and isinstance(out.failed[0][1], OutOfMemory)


def test_batch_limit_doubles_back_after_a_run_of_successful_calls():
    s = make(oom_recover_after=3)
    s.add(req(100, steps=50))
    plan = s.schedule(NOW)
    s.update(plan, StepResult(encoded=list(plan.encode), step_oom=4))
    assert s.batch_limit == 2
    for _ in range(2):
        tick(s)
    assert s.batch_limit == 2
    _, out = tick(s)
    assert s.batch_limit == 4 and out.batch_limit_changed


def test_idle_worker_waits_for_company_but_not_when_a_batch_is_full():
    s = make(max_wait_s=0.05)
    assert s.wait_s(NOW) == 0  # nothing to wait for
    s.add(req(1))
    assert s.wait_s(NOW + 0.01) == pytest.approx(0.04)
    assert s.wait_s(NOW + 0.06) == 0
    s.add(req(3))
    assert s.wait_s(NOW) == 0  # enough tiles for a full batch
    s2 = make(max_wait_s=0.05)
    s2.add(req(1, steps=5))
    tick(s2, NOW + 0.1)
    s2.add(req(1))
    assert s2.wait_s(NOW + 0.1) == 0  # busy: never waits between steps


def test_a_batch_of_one_serves_the_least_work_first_but_never_starves_a_request():
    s = make(max_batch_tiles=1, max_active_tiles=4)
    big = req(3, steps=4)
    s.add(big)
    tick(s)
    small = req(1, steps=2)
    s.add(small)
    order = [tick(s)[0].step[0][0] for _ in range(3)]
    assert order == [small, small, big]  # not: every call to the oldest request until it is done
    assert small not in s
    many = [req(1, steps=8) for _ in range(3)]
    for r in many:
        s.add(r)
    order = [tick(s)[0].step[0][0] for _ in range(2 * STARVE_AFTER + 2)]
    assert big in order  # passed over for the smaller ones at most STARVE_AFTER calls in a row


# ----------------------------------------------------------------------------- several models


def test_a_call_never_mixes_models_and_the_models_take_turns():
    s = make(max_active_tiles=16)
    a1, a2 = req(8, steps=3, model="a"), req(8, steps=3, model="a")
    b = req(2, steps=3, model="b")
    for r in (a1, a2, b):
        s.add(r)
    models = []
    for _ in range(8):
        plan, _ = tick(s)
        if plan.step:
            assert len({r.model for r, _ in plan.step}) == 1  # one model per denoiser call
            assert {r.model for r, _ in plan.encode} <= {plan.step[0][0].model} | {
                r.model for r, _ in plan.encode if r.steps == 0}
            models.append(plan.step[0][0].model)
    assert models[:4] == ["a", "b", "a", "b"]  # a burst for model a does not hold b back
    assert b not in s  # b (3 steps) finished within its three turns


def test_a_burst_for_one_model_does_not_starve_another():
    """Many requests of model a arrive first; a single request of model b is stepped in the first STARVE_AFTER
    calls and finishes long before a's burst does."""
    s = make(max_active_tiles=8, max_batch_tiles=2)
    burst = [req(4, steps=4, model="a") for _ in range(10)]
    for r in burst:
        s.add(r)
    tick(s)
    lone = req(1, steps=2, model="b")
    s.add(lone)
    calls_until_stepped = None
    for n in range(1, 40):
        plan, out = tick(s)
        if calls_until_stepped is None and any(r is lone for r, _ in plan.step):
            calls_until_stepped = n
        if lone in out.completed:
            break
    assert calls_until_stepped is not None and calls_until_stepped <= STARVE_AFTER
    assert n <= 2 * STARVE_AFTER and any(r in s for r in burst)


def test_requests_of_one_model_and_shape_share_calls():
    s = make(max_active_tiles=8)
    a, b = req(2, steps=1, model="m"), req(2, steps=1, model="m")
    s.add(a)
    s.add(b)
    plan = s.schedule(NOW)
    assert {r for r, _ in plan.step} == {a, b} and a.group == b.group == ("m", (16, 16))
