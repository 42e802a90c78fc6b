"""Multi-LoRA serving in the engine against peft: a tiny random Mistral with real PEFT adapters (random A and B, saved
by ``save_pretrained``). References are peft's model (adapter applied) and its merged model, never airun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from airun.errors import FinetuneMissingFilesError, FinetuneNotFoundError, InvalidAdapterError, LoRANotSupportedError
from airun.lora import FinetuneRegistry
from tests.engine_helpers import LogitsRecorder, greedy, make_engine, run_all
from tests.lora_fixtures import hf_greedy, load_peft_model, make_peft_adapter

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of",
    "Once upon a time, in a land far, far away, there lived a king who had three daughters and a very old dragon.",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def adapters(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(tiny_mistral_dir, root / "alpha", seed=11, r=8, lora_alpha=16),
        "beta": make_peft_adapter(tiny_mistral_dir, root / "beta", seed=12, r=4, lora_alpha=12),
        # rsLoRA scale, two projections only, one layer only
        "gamma": make_peft_adapter(tiny_mistral_dir, root / "gamma", seed=13, r=6, lora_alpha=9, use_rslora=True,
                                   target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    }


@pytest.fixture(scope="module")
def peft_models(tiny_mistral_dir: Path, adapters: dict[str, Path]) -> dict[str | None, torch.nn.Module]:
    from transformers import MistralForCausalLM

    models: dict[str | None, torch.nn.Module] = {n: load_peft_model(tiny_mistral_dir, p) for n, p in adapters.items()}
    models[None] = MistralForCausalLM.from_pretrained(tiny_mistral_dir, torch_dtype=torch.float32).eval()
    return models


@pytest.fixture(scope="module")
def prompt_ids(tiny_mistral_dir: Path) -> list[list[int]]:
    from airun.text.tokenizer import load_tokenizer_from_folder

    tok = load_tokenizer_from_folder(tiny_mistral_dir)
    return [tok.encode(p) for p in PROMPTS]


def lora_engine(model_dir: Path, adapters: dict[str, Path], **kw: object):
    modules = {k: str(v) for k, v in adapters.items()}
    return make_engine(model_dir, enable_lora=True, lora_modules=modules, **kw)


@pytest.fixture(scope="module")
def engine(tiny_mistral_dir: Path, adapters: dict[str, Path]):
    return lora_engine(tiny_mistral_dir, adapters, max_loras=4)


@pytest.fixture(scope="module")
def solo(engine, prompt_ids, peft_models) -> dict[tuple[str | None, int], list[int]]:
    """Greedy 12-token outputs of each (adapter, prompt) computed alone by peft (checked equal to airun alone)."""
    return {(n, i): hf_greedy(m, ids, 12) for n, m in peft_models.items() for i, ids in enumerate(prompt_ids)}


def test_adapters_change_the_model(prompt_ids, peft_models):
    ids = torch.tensor([prompt_ids[0]])
    with torch.no_grad():
        base = peft_models[None](ids).logits
        for name in ("alpha", "beta", "gamma"):
            assert (peft_models[name](ids).logits - base).abs().max().item() > 0.05, name


@pytest.mark.parametrize("name", ["alpha", "gamma"])
def test_logits_match_peft_and_merged_model_at_every_step(tiny_mistral_dir, adapters, peft_models, prompt_ids, name):
    engine = lora_engine(tiny_mistral_dir, adapters, block_size=4, max_num_batched_tokens=16)  # chunked prefill
    rec = LogitsRecorder(engine)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, greedy(6), cache_key=name)
    rows: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompt_ids))}
    generated: dict[str, list[int]] = {str(i): [] for i in range(len(prompt_ids))}
    while engine.has_unfinished():
        outs = engine.step()
        if outs:
            for row, o in zip(rec.steps[-1], outs, strict=True):
                rows[o.request_id].append(row)
                generated[o.request_id].extend(o.token_ids)
    rec.close()
    merged = load_peft_model(tiny_mistral_dir, adapters[name]).merge_and_unload().eval()
    worst = {"peft": 0.0, "merged": 0.0}
    for i, ids in enumerate(prompt_ids):
        rid = str(i)
        assert len(rows[rid]) == 6 and generated[rid] == hf_greedy(peft_models[name], ids, 6)
        full = torch.tensor([ids + generated[rid][:-1]])  # logits at position p depend on tokens <= p only
        got = torch.stack(rows[rid])
        with torch.no_grad():
            for ref_name, model in (("peft", peft_models[name]), ("merged", merged)):
                ref = model(full).logits[0, len(ids) - 1 :]
                worst[ref_name] = max(worst[ref_name], (ref - got).abs().max().item())
    assert worst["peft"] <= 1e-4 and worst["merged"] <= 1e-4, worst


def test_mixed_batch_of_twelve_gives_each_its_solo_output(engine, prompt_ids, solo):
    # 12 concurrent requests: two adapters and the base model, four prompts each, admitted in an interleaved order.
    requests = {}
    for k in range(12):
        name = ["alpha", "beta", None][k % 3]
        requests[f"r{k}"] = (name, k % 4)
    for rid, (name, i) in requests.items():
        engine.add_request(rid, prompt_ids[i], greedy(12), cache_key=name)
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    for rid, key in requests.items():
        assert got[rid] == solo[key], (rid, key)
    # and one of them alone through airun gives the same
    alone = run_all(engine, {"alone": (prompt_ids[2], greedy(12))})
    assert alone["alone"] == solo[(None, 2)]
    assert engine.kv.num_used_blocks == 0


def test_more_adapters_than_slots_queue_and_evict(tiny_mistral_dir, adapters, prompt_ids, solo):
    # Two slots for three adapters: the scheduler admits at most two adapters at once, the manager evicts the least
    # recently used idle one, and every request still gets exactly its own adapter's output.
    engine = lora_engine(tiny_mistral_dir, adapters, max_loras=2)
    names = ["alpha", "beta", "gamma", None, "gamma", "alpha"]
    for k, name in enumerate(names):
        engine.add_request(f"r{k}", prompt_ids[k % 4], greedy(12), cache_key=name)
    got: dict[str, list[int]] = {f"r{k}": [] for k in range(len(names))}
    max_running_adapters = 0
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
        running = {s.cache_key for s in engine.scheduler.running if s.cache_key is not None}
        assert running <= set(engine.lora.resident)  # adapters of running requests are resident
        max_running_adapters = max(max_running_adapters, len(running))
    assert max_running_adapters == 2
    assert engine.lora.num_evictions >= 1
    for k, name in enumerate(names):
        key = (name, k % 4)
        assert got[f"r{k}"] == solo[key], key


def test_prefix_cache_never_crosses_adapters(tiny_mistral_dir, adapters, prompt_ids, solo):
    engine = lora_engine(tiny_mistral_dir, adapters)  # an empty prefix cache
    ids = prompt_ids[2]  # long enough for several full blocks
    outs = {}
    for rid, name in (("a1", "alpha"), ("b1", "beta"), ("a2", "alpha"), ("n1", None)):
        engine.add_request(rid, ids, greedy(12), cache_key=name)
        res = []
        while engine.has_unfinished():
            res.extend(engine.step())
        outs[rid] = ([t for o in res for t in o.token_ids], res[-1].num_cached_tokens)
    full_blocks = (len(ids) - 1) // engine.args.block_size * engine.args.block_size
    assert outs["b1"][1] == 0  # beta's first request finds nothing of alpha's
    assert outs["n1"][1] == 0  # nor does the base model
    assert outs["a2"][1] == full_blocks > 0  # alpha's second request does hit alpha's own blocks
    assert outs["a1"][0] == outs["a2"][0] == solo[("alpha", 2)]
    assert outs["b1"][0] == solo[("beta", 2)] != outs["a1"][0]
    assert outs["n1"][0] == solo[(None, 2)]


def test_registry_fine_tune_by_name_and_by_id(tiny_mistral_dir, adapters, prompt_ids, solo, tmp_path):
    reg = FinetuneRegistry(tmp_path)
    ft = reg.create("@cf/mistral/mistral-7b-instruct-v0.2-lora", "my-alpha")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        reg.put_asset(ft.id, f, (adapters["alpha"] / f).read_bytes())
    engine = make_engine(tiny_mistral_dir, enable_lora=True, data_dir=str(tmp_path))
    engine.add_request("n", prompt_ids[2], greedy(12), cache_key="my-alpha")
    res_n = []
    while engine.has_unfinished():
        res_n.extend(engine.step())
    engine.add_request("i", prompt_ids[2], greedy(12), cache_key=ft.id)
    res_i = []
    while engine.has_unfinished():
        res_i.extend(engine.step())
    assert [t for o in res_n for t in o.token_ids] == [t for o in res_i for t in o.token_ids] == solo[("alpha", 2)]
    assert res_i[-1].num_cached_tokens > 0  # name and id are one adapter: one cache key, one slot
    assert engine.lora.num_loads == 1 and len(engine.lora.resident) == 1


def test_replaced_asset_gets_a_new_key(tiny_mistral_dir, adapters, prompt_ids, solo, tmp_path):
    reg = FinetuneRegistry(tmp_path)
    ft = reg.create("m", "swap")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        reg.put_asset(ft.id, f, (adapters["alpha"] / f).read_bytes())
    engine = make_engine(tiny_mistral_dir, enable_lora=True, data_dir=str(tmp_path))
    first = run_all_lora(engine, prompt_ids[2], "swap")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        reg.put_asset(ft.id, f, (adapters["beta"] / f).read_bytes())
    second = run_all_lora(engine, prompt_ids[2], "swap")
    assert first == (solo[("alpha", 2)], 0)
    assert second == (solo[("beta", 2)], 0)


def run_all_lora(engine, ids: list[int], lora: str | None) -> tuple[list[int], int]:
    engine.add_request(f"x{engine.stats_prompt_tokens}", ids, greedy(12), cache_key=lora)
    res = []
    while engine.has_unfinished():
        res.extend(engine.step())
    return [t for o in res for t in o.token_ids], res[-1].num_cached_tokens


def test_lora_errors_queue_nothing(tiny_mistral_dir, adapters, engine, prompt_ids, tmp_path):
    plain = make_engine(tiny_mistral_dir)
    with pytest.raises(LoRANotSupportedError, match="does not support LoRa inference"):
        plain.add_request("p", prompt_ids[0], greedy(2), cache_key="alpha")
    with pytest.raises(FinetuneNotFoundError, match="Finetune nope not found"):
        engine.add_request("u", prompt_ids[0], greedy(2), cache_key="nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapters["alpha"] / "adapter_config.json").read_bytes())
    missing = lora_engine(tiny_mistral_dir, {"broken": broken})
    with pytest.raises(FinetuneMissingFilesError, match="missing required files"):
        missing.add_request("m", prompt_ids[0], greedy(2), cache_key="broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidAdapterError, match="safetensors"):
        missing.add_request("m", prompt_ids[0], greedy(2), cache_key="broken")
    for e in (plain, engine, missing):
        assert not e.has_unfinished() and not e.scheduler.has_unfinished()
    assert run_all(engine, {"ok": (prompt_ids[0], greedy(2))})["ok"]  # still serving
