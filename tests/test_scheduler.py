"""The server's scheduler on its own: rows that join a running batch at a canvas boundary give
the tokens of their request served alone (and of stream_generate with the same seed), rows
leave when done, clients that leave are dropped, and the prompt store makes a second turn
encode only its new tokens."""

import threading
import time

import pytest

from mlx_diffusiongemma.generation import stream_generate
from mlx_diffusiongemma.loader import load_model
from mlx_diffusiongemma.sampler import SamplerSettings
from mlx_diffusiongemma.serving.prompt_store import PromptStore
from mlx_diffusiongemma.serving.scheduler import Job, Scheduler


class Recorder(Job):
    def __init__(self, prompt, max_tokens, seed, n=1, steps=3, gate=None):
        super().__init__(
            prompt, SamplerSettings(max_tokens=max_tokens, max_denoising_steps=steps), n, seed
        )
        self.tokens = [[] for _ in range(n)]
        self.finish = [None] * n
        self.canvases = 0
        self.cached = None
        self.gate = gate  # set after this job's first canvas
        self.done = threading.Event()

    def on_start(self, cached):
        self.cached = cached

    def on_tokens(self, row, tokens, finish):
        self.tokens[row] += tokens
        self.canvases += 1
        if self.gate is not None:
            self.gate.set()
        return False

    def on_done(self, row, finish):
        self.finish[row] = finish
        if all(self.finish):
            self.done.set()

    def on_error(self, message):
        self.finish = [message] * self.n
        self.done.set()


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny[0])


def no_eos(scheduler):
    scheduler.generator.eos = set()  # lengths exact and comparable
    return scheduler


def run(scheduler, *jobs, timeout=120):
    for job in jobs:
        scheduler.submit(job)
    for job in jobs:
        assert job.done.wait(timeout)


def test_rows_joining_at_canvas_boundaries_equal_their_solo_runs(model):
    sch = no_eos(Scheduler(model, None, max_batch=4))
    try:
        a_solo = Recorder([4, 5, 6], 48, seed=1)
        b_solo = Recorder([9, 8, 7, 6, 5, 4, 3], 20, seed=2)
        run(sch, a_solo)
        run(sch, b_solo)
        before = dict(sch.stats)
        gate = threading.Event()
        a = Recorder([4, 5, 6], 48, seed=1, gate=gate)
        b = Recorder([9, 8, 7, 6, 5, 4, 3], 20, seed=2)
        sch.submit(a)
        assert gate.wait(60)  # a is past its first canvas: b joins a running batch
        run(sch, b)
        assert a.done.wait(60)
        assert a.tokens == a_solo.tokens and b.tokens == b_solo.tokens
        assert [len(a.tokens[0]), len(b.tokens[0])] == [48, 20]  # max_tokens exact
        rows = sch.stats["canvas_rows"] - before["canvas_rows"]
        assert rows > sch.stats["canvases"] - before["canvases"]  # canvases were shared
        # and stream_generate with the seed draws the same
        rs = stream_generate(
            model, None, [4, 5, 6], max_tokens=48, seed=1, max_denoising_steps=3, eos_token_ids=[]
        )
        solo = [t for r in rs for t in r.tokens]
        assert solo == a.tokens[0]
    finally:
        sch.stop()


def test_n_choices_are_seed_plus_index(model):
    sch = no_eos(Scheduler(model, None, max_batch=4))
    try:
        three, one = Recorder([5, 6, 7], 16, seed=10, n=3), Recorder([5, 6, 7], 16, seed=12)
        run(sch, three, one)
        assert three.tokens[2] == one.tokens[0] and three.tokens[0] != three.tokens[1]
    finally:
        sch.stop()


def test_cancelled_rows_leave_the_batch(model):
    sch = no_eos(Scheduler(model, None, max_batch=4))
    try:
        gate = threading.Event()
        long = Recorder([3, 4], 16 * 50, seed=0, steps=2, gate=gate)
        sch.submit(long)
        assert gate.wait(60)
        long.cancelled.set()
        deadline = time.time() + 30
        while sch.active_rows and time.time() < deadline:
            time.sleep(0.05)
        assert sch.active_rows == 0 and long.canvases < 50
        quick = Recorder([3, 4], 8, seed=0)
        run(sch, quick)
        assert quick.finish == ["length"]
    finally:
        sch.stop()


def test_prompt_store_second_turn_encodes_only_new_tokens(model):
    sch = no_eos(Scheduler(model, None, PromptStore(4), max_batch=2))
    try:
        turn1 = Recorder([4, 5, 6, 7], 20, seed=3)
        run(sch, turn1)
        encoded = sch.stats["prompt_tokens_encoded"]
        new = [11, 12, 13]
        turn2 = Recorder([4, 5, 6, 7] + turn1.tokens[0] + new, 16, seed=4)
        run(sch, turn2)
        assert turn2.cached == 4 + 20
        assert sch.stats["prompt_tokens_encoded"] - encoded == len(new)
        # the same turn 2 through a fresh cache gives the same tokens
        fresh = no_eos(Scheduler(model, None, max_batch=2))
        again = Recorder(turn2.prompt, 16, seed=4)
        run(fresh, again)
        fresh.stop()
        assert again.tokens == turn2.tokens
    finally:
        sch.stop()


def test_store_is_bounded():
    from mlx_diffusiongemma.cache import PromptCache

    store = PromptStore(2)
    for i in range(4):
        store.insert([i, i + 1], PromptCache([False], 8))
    assert len(store) == 2 and store.fetch([0, 1, 2])[0] is None
    assert store.fetch([3, 4, 5])[1] == 2
