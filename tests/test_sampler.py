"""The batched sampler: seeded reproducibility, greedy equivalences, penalties, top-k/top-p sets, masks, statistics.

Expected values come from hand computation, published SplitMix64 vectors and transformers' logits processors.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from airun.engine.sequence import Sequence
from airun.layers.sampler import (
    Sampler,
    apply_penalties,
    build_sampling_batch,
    gumbel_noise,
    mix64,
    random_bits,
    row_keys,
    uniform_from_bits,
)
from airun.sampling_params import SamplingParams

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
SAMPLER = Sampler()


def py_mix64(z: int) -> int:
    """SplitMix64's output function on Python ints (the reference the tensor version must match)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_splitmix64(seed: int, count: int) -> list[int]:
    return [py_mix64((seed + n * GAMMA) & M64) for n in range(1, count + 1)]


def signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def seq(
    prompt: list[int], output: list[int] | None = None, rid: str = "r", **params: object
) -> Sequence:
    output = output or []
    return Sequence(
        request_id=rid,
        token_ids=list(prompt) + list(output),
        sampling=SamplingParams(**params),  # type: ignore[arg-type]
        num_prompt_tokens=len(prompt),
    )


def draws(logits_row: list[float], n: int, seed: int = 7, **params: object) -> torch.Tensor:
    """``n`` consecutive steps (0..n-1) of one seeded request on fixed logits, computed as one batch of n rows.

    The request's row is built once and repeated with ``steps = 0..n-1`` (a real request would need n outputs).
    """
    one = build_sampling_batch([seq([0], seed=seed, **params)], len(logits_row))
    assert one.seen_mask is None and one.output_counts is None and one.allowed_mask is None
    per_row = ("temperature", "top_k", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seeds",
               "greedy")
    batch = replace(one, steps=torch.arange(n), **{f: getattr(one, f).repeat(n) for f in per_row})
    return SAMPLER(torch.tensor([logits_row] * n, dtype=torch.float32), batch)


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


# --- the counter-based random numbers -------------------------------------------------------------------------------


def test_py_reference_matches_published_splitmix64_vectors() -> None:
    # Rosetta Code "Pseudo-random numbers/Splitmix64" (seed 1234567) and Vigna's splitmix64.c first output for seed 0.
    assert py_splitmix64(1234567, 5) == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert py_splitmix64(0, 1) == [0xE220A8397B1DCDAF]


def test_tensor_mix64_matches_published_vectors() -> None:
    n = torch.arange(1, 6, dtype=torch.int64)
    states = torch.full((5,), 1234567, dtype=torch.int64) + n * signed(GAMMA)
    assert [v & M64 for v in mix64(states).tolist()] == py_splitmix64(1234567, 5)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**62 + 12345, 2**63 - 1])
def test_random_bits_match_python_reference(seed: int) -> None:
    steps = torch.tensor([0, 1, 17, 100_000], dtype=torch.int64)
    seeds = torch.full_like(steps, seed)
    ids = torch.tensor([[0, 1, 2, 31999, 50_000]], dtype=torch.int64)
    bits = random_bits(row_keys(seeds, steps), ids)
    for r, step in enumerate(steps.tolist()):
        key = py_splitmix64(py_mix64(seed), step + 1)[-1]
        expected = [py_splitmix64(key, v + 1)[-1] for v in ids[0].tolist()]
        assert [b & M64 for b in bits[r].tolist()] == expected


def test_uniforms_are_strictly_inside_unit_interval() -> None:
    extremes = torch.tensor([0, -1, signed(0xFFF), signed(0xFFFFFFFFFFFFF000)], dtype=torch.int64)
    u = uniform_from_bits(extremes)
    assert u.tolist() == [2.0**-53, 1.0 - 2.0**-53, 2.0**-53, 1.0 - 2.0**-53]
    g = gumbel_noise(torch.tensor([0]), torch.arange(4096).unsqueeze(0))
    assert torch.isfinite(g).all()


def test_uniform_statistics() -> None:
    keys = row_keys(torch.arange(64, dtype=torch.int64) * 1000 + 3, torch.arange(64, dtype=torch.int64))
    u = uniform_from_bits(random_bits(keys, torch.arange(16384).unsqueeze(0))).flatten()
    n = u.numel()
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.002  # sd of the mean: sqrt(1/12 / 2**20) ~ 0.00028
    assert abs(float(u.var()) - 1.0 / 12.0) < 0.001
    bins = torch.bincount((u * 64).long(), minlength=64).tolist()
    # chi-square with 63 degrees of freedom: 0.999 quantile ~ 103.4
    assert chi_square(bins, [1.0 / 64] * 64) < 103.4
    # consecutive steps of one seed are uncorrelated: |r| << 5 sd with sd ~ 1/sqrt(16384) ~ 0.0078
    same_seed = uniform_from_bits(
        random_bits(row_keys(torch.tensor([9, 9]), torch.tensor([5, 6])), torch.arange(16384).unsqueeze(0))
    )
    centered = same_seed - 0.5
    r = float((centered[0] * centered[1]).mean() / (centered[0].std() * centered[1].std()))
    assert abs(r) < 0.04


def test_sampled_frequencies_match_the_distribution() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(p) for p in probs]
    tokens = draws(logits, 20_000, seed=1234, temperature=1.0)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert chi_square(counts, probs) < 16.27  # 3 degrees of freedom, 0.999 quantile
    # temperature 2 flattens to p**(1/2), normalized
    roots = [math.sqrt(p) for p in probs]
    hot = [r / sum(roots) for r in roots]
    counts = torch.bincount(draws(logits, 20_000, seed=99, temperature=2.0), minlength=4).tolist()
    assert chi_square(counts, hot) < 16.27
    # across seeds at one step
    seqs = [seq([0], seed=s, temperature=1.0) for s in range(20_000)]
    batch = build_sampling_batch(seqs, 4)
    counts = torch.bincount(SAMPLER(torch.tensor([logits] * 20_000), batch), minlength=4).tolist()
    assert chi_square(counts, probs) < 16.27


# --- reproducibility ------------------------------------------------------------------------------------------------

TARGETS: list[dict[str, object]] = [
    {"temperature": 0.9},
    {"temperature": 0.7, "top_k": 20},
    {"temperature": 1.1, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.3, "frequency_penalty": 0.4},
]
OTHERS: list[dict[str, object]] = [
    {"temperature": 1.0, "seed": 5},  # no top-k: full-vocabulary path
    {"temperature": 1.0, "top_k": 5, "seed": 6},
    {"temperature": 0.5, "top_p": 0.5, "seed": 7},  # forces the sorted path
    {"temperature": 0.0, "seed": 8},  # greedy
    {"temperature": 1.0, "top_k": 1000, "presence_penalty": 1.0, "seed": 9},
]


def run_target(
    target: dict[str, object], companions: list[dict[str, object]], position: int, steps: int, vocab: int
) -> list[int]:
    """Generate ``steps`` tokens of a seeded target request, batched with companions, the target at ``position``."""
    gen = torch.Generator().manual_seed(0)
    other_gen = torch.Generator().manual_seed(1000 + position + 31 * len(companions))
    prompt = [3, 14, 15, 92, 65]
    out: list[int] = []
    for _ in range(steps):
        target_logits = torch.randn(vocab, generator=gen) * 3
        rows = [seq(prompt, [1, 2] * (k + 1), rid=f"o{k}", **c) for k, c in enumerate(companions)]
        logits = [torch.randn(vocab, generator=other_gen) * 3 for _ in companions]
        rows.insert(position, seq(prompt, out, rid="t", seed=2024, **target))
        logits.insert(position, target_logits)
        batch = build_sampling_batch(rows, vocab)
        tokens = SAMPLER(torch.stack(logits), batch)
        out.append(int(tokens[position]))
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_seeded_request_is_batch_invariant(target: dict[str, object]) -> None:
    vocab, steps = 3000, 12
    alone = run_target(target, [], 0, steps, vocab)
    assert run_target(target, [], 0, steps, vocab) == alone  # same across calls
    assert run_target(target, OTHERS, 0, steps, vocab) == alone
    assert run_target(target, OTHERS, 3, steps, vocab) == alone
    assert run_target(target, OTHERS[1:2], 1, steps, vocab) == alone  # with a top-k target, every row limits top-k
    assert run_target(target, OTHERS[2:4], 2, steps, vocab) == alone
    assert len(set(alone)) > 1


def test_different_seeds_differ() -> None:
    logits = [0.0] * 1000
    a = draws(logits, 50, seed=1, temperature=1.0).tolist()
    b = draws(logits, 50, seed=2, temperature=1.0).tolist()
    assert a != b
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5


# --- greedy equivalences --------------------------------------------------------------------------------------------


def peaked_logits(targets: list[int], vocab: int) -> torch.Tensor:
    """Random logits in [0, 1) with 1.5 at ``targets[i]``, so row i's argmax is ``targets[i]`` by construction."""
    x = torch.rand(len(targets), vocab, generator=torch.Generator().manual_seed(3))
    x[torch.arange(len(targets)), torch.tensor(targets)] = 1.5
    return x


def test_top_k_one_and_temperature_zero_are_greedy() -> None:
    targets = [5, 17, 99, 0, 63]
    params: list[dict[str, object]] = [
        {"temperature": 0.0},
        {"temperature": 0.0, "top_p": 0.3, "top_k": 7, "seed": 11},
        {"temperature": 1.5, "top_k": 1, "seed": 12},
        {"temperature": 2.0, "top_k": 1, "top_p": 0.5, "seed": 13},
        {"temperature": 0.0, "seed": 14},
    ]
    batch = build_sampling_batch([seq([1], **{"seed": 0, **p}) for p in params], 100)
    assert batch.all_greedy
    assert SAMPLER(peaked_logits(targets, 100), batch).tolist() == targets
    # mixed with sampled rows, greedy rows still take the argmax
    mixed = params + [{"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "top_p": 0.5, "seed": 4}]
    batch = build_sampling_batch([seq([1], **{"seed": 0, **p}) for p in mixed], 100)
    assert not batch.all_greedy and batch.any_greedy
    tokens = SAMPLER(peaked_logits(targets + [1, 2], 100), batch).tolist()
    assert tokens[:5] == targets


# --- penalties ------------------------------------------------------------------------------------------------------

LOGITS6 = [1.0, 2.0, -1.0, 0.5, -2.0, 3.0]


def penalized(**params: object) -> list[float]:
    # prompt [1, 2], output [2, 3, 3]; a second row without penalties must stay untouched
    rows = [seq([1, 2], [2, 3, 3], seed=0, **params), seq([1, 2], [2, 3, 3], seed=0)]
    batch = build_sampling_batch(rows, 6)
    out = apply_penalties(torch.tensor([LOGITS6, LOGITS6]), batch)
    assert out[1].tolist() == LOGITS6
    return out[0].tolist()


def test_repetition_penalty_by_hand() -> None:
    # seen = {1, 2, 3}: 2.0 / 2 = 1.0; -1.0 * 2 = -2.0; 0.5 / 2 = 0.25
    assert penalized(repetition_penalty=2.0) == [1.0, 1.0, -2.0, 0.25, -2.0, 3.0]


def test_frequency_and_presence_penalties_by_hand() -> None:
    # output counts: token 2 once, token 3 twice; token 1 only in the prompt is untouched
    assert penalized(frequency_penalty=0.5) == [1.0, 2.0, -1.5, -0.5, -2.0, 3.0]
    assert penalized(presence_penalty=0.25) == [1.0, 2.0, -1.25, 0.25, -2.0, 3.0]
    # -1 - 0.5*1 - 0.25 = -1.75; 0.5 - 0.5*2 - 0.25 = -0.75
    assert penalized(frequency_penalty=0.5, presence_penalty=0.25) == [1.0, 2.0, -1.75, -0.75, -2.0, 3.0]
    assert penalized(frequency_penalty=-1.0) == [1.0, 2.0, 0.0, 2.5, -2.0, 3.0]


def test_penalties_compose_repetition_first() -> None:
    # repetition: [1, 1, -2, 0.25, -2, 3]; then token 2: -2 - 0.75 = -2.75, token 3: 0.25 - 1.25 = -1.0
    assert penalized(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25) == [
        1.0,
        1.0,
        -2.75,
        -1.0,
        -2.0,
        3.0,
    ]


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(5)
    vocab = 500
    histories = [torch.randint(0, vocab, (40,), generator=gen).tolist() for _ in range(3)]
    logits = torch.randn(3, vocab, generator=gen) * 4
    rows = [seq(h[:25], h[25:], rid=str(i), repetition_penalty=1.3, seed=0) for i, h in enumerate(histories)]
    ours = apply_penalties(logits, build_sampling_batch(rows, vocab))
    reference = RepetitionPenaltyLogitsProcessor(penalty=1.3)(torch.tensor(histories), logits.clone())
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


# --- top-k, top-p, allowed tokens -----------------------------------------------------------------------------------

# probabilities 0.5, 0.25, 0.15, 0.06, 0.04 placed at vocabulary ids 4, 1, 6, 0, 2 of a vocabulary of 8
PROBS = {4: 0.5, 1: 0.25, 6: 0.15, 0: 0.06, 2: 0.04}
LOGITS8 = [math.log(PROBS[v]) if v in PROBS else -1e4 for v in range(8)]


def drawn_set(n: int = 4000, **params: object) -> dict[int, int]:
    counts = torch.bincount(draws(LOGITS8, n, **params), minlength=8).tolist()
    return {v: c for v, c in enumerate(counts) if c}


def test_top_k_keeps_exactly_the_k_largest() -> None:
    assert set(drawn_set(temperature=1.0, top_k=3)) == {4, 1, 6}
    assert set(drawn_set(temperature=5.0, top_k=2)) == {4, 1}
    flat = [float(v % 7) for v in range(64)]  # 6.0 at ids 6, 13, ..., 62; 5.0 at ids 5, 12, ..., 61
    tokens = draws(flat, 3000, temperature=10.0, top_k=9).tolist()
    assert set(tokens) == {6, 13, 20, 27, 34, 41, 48, 55, 62}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert set(drawn_set(temperature=1.0, top_p=0.8)) == {4, 1, 6}  # 0.5 + 0.25 < 0.8 <= 0.9
    assert set(drawn_set(temperature=1.0, top_p=0.7)) == {4, 1}  # 0.5 < 0.7 <= 0.75
    assert set(drawn_set(temperature=1.0, top_p=0.3)) == {4}  # the top-1 always stays
    assert set(drawn_set(temperature=1.0, top_p=0.93)) == {4, 1, 6, 0}
    # top-p after top-k sees renormalized probabilities: top-2 gives 2/3, 1/3; 2/3 >= 0.6 drops id 1
    assert set(drawn_set(temperature=1.0, top_k=2, top_p=0.6)) == {4}
    assert set(drawn_set(temperature=1.0, top_k=2, top_p=0.7)) == {4, 1}


def test_top_p_frequencies_are_renormalized() -> None:
    counts = drawn_set(n=20_000, seed=77, temperature=1.0, top_p=0.8)
    kept = [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9]
    assert chi_square([counts[4], counts[1], counts[6]], kept) < 13.82  # 2 degrees of freedom, 0.999 quantile


def test_allowed_token_mask_is_respected() -> None:
    seen_outputs: list[list[int]] = []

    def only_3_and_7(output: list[int]) -> list[int]:
        seen_outputs.append(list(output))
        return [3, 7]

    def allow_all(output: list[int]) -> None:
        return None

    rows = [
        seq([1, 2], [5] * step, rid=str(step), seed=1, temperature=1.0, allowed_token_fn=only_3_and_7)
        for step in range(2000)
    ]
    rows.append(seq([1], rid="greedy", temperature=0.0, seed=0, allowed_token_fn=only_3_and_7))
    rows.append(seq([1], rid="free", temperature=0.0, seed=0, allowed_token_fn=allow_all))
    batch = build_sampling_batch(rows, 10)
    assert seen_outputs[:3] == [[], [5], [5, 5]]
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0, 6.0, 5.0, 4.0, 0.5, 3.0, 2.0]] * len(rows))
    tokens = SAMPLER(logits, batch).tolist()
    assert set(tokens[:2000]) == {3, 7}
    assert tokens[2000] == 7  # greedy among the allowed
    assert tokens[2001] == 0  # unrestricted row


def test_allowed_token_fn_must_allow_something() -> None:
    with pytest.raises(ValueError):
        build_sampling_batch([seq([1], seed=0, allowed_token_fn=lambda output: [])], 10)


def test_build_sampling_batch_fields() -> None:
    rows = [
        seq([1, 2, 3], [4, 5], rid="a", temperature=0.5, top_k=50, top_p=0.9, seed=17),
        seq([1], rid="b", temperature=1.0, top_k=10, seed=None),
        seq([1], rid="c", temperature=0.0, top_k=0, seed=3),
    ]
    batch = build_sampling_batch(rows, 32)
    assert batch.steps.tolist() == [2, 0, 0]
    assert batch.seeds.tolist() == [17, 0, 3]  # an unset seed is treated as 0
    assert batch.top_k.tolist() == [0, 10, 0]  # top_k >= vocab is off
    assert batch.greedy.tolist() == [False, False, True]
    assert (batch.all_greedy, batch.any_greedy, batch.any_top_k, batch.all_top_k) == (False, True, True, False)
    assert (batch.max_top_k, batch.any_top_p) == (10, True)
    assert batch.seen_mask is None and batch.output_counts is None and batch.allowed_mask is None
