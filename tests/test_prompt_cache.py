"""`PromptCache`: the text encoder runs once per distinct prompt, and cached c is the encoder's own."""

import pytest
import torch

from latent_consistency.pipelines import LCMGenerator, SolverGenerator
from latent_consistency.prompts import PromptCache

CPU = torch.device("cpu")


class CountingEncoder:
    """c = a row that names the prompt, the size and how many calls the encoder has had; counts the prompts it encodes."""

    def __init__(self):
        self.calls, self.prompts = 0, []

    def encode(self, prompts, device=None, size=None):
        self.calls += 1
        self.prompts += prompts
        return torch.stack([torch.tensor([[float(len(p)), float(sum(map(ord, p))), float((size or (0,))[0])]]) for p in prompts])

    def uncond(self, device=None, size=None):
        return self.encode([""], device, size)


def test_each_distinct_prompt_is_encoded_once_and_rows_follow_the_prompts():
    encoder, cache = CountingEncoder(), PromptCache()
    c = cache.encode(encoder, ["a", "bb", "a", "a"], CPU, (32, 32))
    assert encoder.prompts == ["a", "bb"] and encoder.calls == 1  # the new prompts as one batch, duplicates once
    assert torch.equal(c, encoder.encode(["a", "bb", "a", "a"], CPU, (32, 32)))
    encoder.prompts.clear()
    again = cache.encode(encoder, ["bb", "a"], CPU, (32, 32))
    assert encoder.prompts == [] and torch.equal(again, c[[1, 0]])
    cache.encode(encoder, ["a"], CPU, (64, 64))  # another size is another condition (SDXL's and PixArt's c carry it)
    assert encoder.prompts == ["a"]
    assert cache.encoded == 3


def test_least_recently_used_prompts_are_dropped_past_the_capacity():
    encoder, cache = CountingEncoder(), PromptCache(capacity=2)
    cache.encode(encoder, ["a", "b"], CPU)
    cache.encode(encoder, ["a"], CPU)  # b is now the least recently used
    cache.encode(encoder, ["c"], CPU)
    encoder.prompts.clear()
    cache.encode(encoder, ["a", "c"], CPU)
    assert encoder.prompts == []
    cache.encode(encoder, ["b"], CPU)
    assert encoder.prompts == ["b"] and len(cache.rows) == 2
    with pytest.raises(ValueError):
        PromptCache(capacity=0)


def test_uncond_is_computed_once_per_size():
    encoder, cache = CountingEncoder(), PromptCache()
    first = cache.uncond(encoder, CPU, (32, 32))
    assert torch.equal(first, encoder.uncond(CPU, (32, 32)))
    calls = encoder.calls
    assert torch.equal(cache.uncond(encoder, CPU, (32, 32)), first) and encoder.calls == calls
    cache.uncond(encoder, CPU, (64, 64))
    assert encoder.calls == calls + 1


def test_a_generator_encodes_a_prompt_once_and_its_images_do_not_change(tiny_lcm):
    generator = LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)
    timesteps, size = generator.timesteps(2), generator.default_size()
    first = generator(["a red star"], timesteps, 2.0, [5], size, size)
    assert generator.prompt_cache.encoded == 1
    assert torch.equal(generator(["a red star"], timesteps, 2.0, [5], size, size), first)  # from the cache: the same c
    again = generator(["a red star", "a red star", "a blue ring"], timesteps, 2.0, [5, 6, 7], size, size)
    assert generator.prompt_cache.encoded == 2  # only the blue ring was new
    fresh = LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)
    fresh.prompt_cache = PromptCache(capacity=1)
    reference = torch.cat([fresh([p], timesteps, 2.0, [s], size, size) for p, s in (("a red star", 5), ("a red star", 6),
                                                                                    ("a blue ring", 7))])
    assert torch.allclose(again, reference, atol=1e-5)  # batched or not, up to the convolutions' rounding
    cond = generator.model.prompts.encode(["a red star", "a blue ring"], CPU)
    cached = generator.prompt_cache.encode(generator.model.prompts, ["a red star", "a blue ring"], CPU, (size, size))
    assert torch.allclose(cached, cond, atol=1e-6)


def test_a_solver_generator_caches_the_unconditional_embedding(tiny_sd):
    generator = SolverGenerator.load(str(tiny_sd), CPU, torch.float32, "ddim")
    size = generator.default_size()
    images = generator(["a red star"], 2, 3.0, [1], size, size)
    assert torch.equal(generator(["a red star"], 2, 3.0, [1], size, size), images)
    assert torch.equal(generator.prompt_cache.uncond(generator.model.prompts, CPU, (size, size)), generator.model.prompts.uncond(CPU))


def test_threads_sharing_a_cache_get_their_own_prompts_rows():
    """A generator's cache shared by threads (a front end that calls one generator from several): a prompt another thread
    evicts between this thread's insertion and its lookup must not fail or give another prompt's row."""
    import sys
    import threading

    encoder, cache, errors = CountingEncoder(), PromptCache(capacity=1), []

    def worker(i: int):
        try:
            for j in range(3000):
                prompt = f"p{i}-{j}"
                assert torch.equal(cache.encode(encoder, [prompt, prompt], CPU, (32, 32))[0], encoder.encode([prompt], CPU, (32, 32))[0])
        except Exception as error:  # any failure of a thread fails the test
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between almost every bytecode
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
