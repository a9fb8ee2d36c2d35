"""KV-cached decoding equals the uncached loop; saved models are checked before and after loading."""

import json
import struct
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

from pimoe.moe import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM

TINY = LMConfig(
    block_size=24,
    n_layer=2,
    n_head=2,
    d_model=32,
    moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
)


def _model(config: LMConfig = TINY) -> PiMoELM:
    torch.manual_seed(0)
    return PiMoELM(config).eval()


@pytest.mark.parametrize("new_tokens", [5, 40])  # 40 runs past block_size: the window slides
def test_cached_greedy_and_sampled_generation_equal_the_uncached_loop(new_tokens: int) -> None:
    model = _model()
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, new_tokens, temperature=0)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    sampled = [
        model.generate(
            prompt,
            new_tokens,
            temperature=0.9,
            top_k=20,
            use_cache=use,
            generator=torch.Generator().manual_seed(3),
        )
        for use in (True, False)
    ]
    assert torch.equal(*sampled)


def test_extending_the_cache_by_several_tokens_matches_a_full_forward() -> None:
    model = _model()
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx).logits  # [2, 20, V]
    cache = model.new_cache(2)
    pieces = [
        model(idx[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 7), (7, 15), (15, 20))
    ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20
    with pytest.raises(ValueError, match="exceed"):
        model(idx[:, :5], cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(idx[:1, :1], cache=model.new_cache(2))


def test_non_causal_routing_decodes_without_the_cache() -> None:
    model = _model(replace(TINY, moe=TINY.moe.replace(capacity_factor=1.0)))
    assert not model.can_cache
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(
        model.generate(prompt, 10, temperature=0),
        model.generate(prompt, 10, temperature=0, use_cache=False),
    )
    assert _model().can_cache


def test_save_load_round_trip_keeps_outputs_and_config(tmp_path) -> None:
    model = _model()
    path = tmp_path / "lm.safetensors"
    model.save(path)
    loaded = PiMoELM.load(path)
    assert loaded.config == model.config
    idx = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits)
    assert not list(tmp_path.glob(".*tmp"))


def test_older_flat_config_metadata_still_loads(tmp_path) -> None:
    model = _model()
    path = tmp_path / "old.safetensors"
    flat = {k: v for k, v in asdict(TINY).items() if k != "moe"}
    flat.update(
        num_experts=4, top_k=2, ffn_dim=32, shared_experts=0, aux_loss_coef=0.01, z_loss_coef=0.0
    )
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path), metadata={"pimoe.LMConfig": json.dumps(flat)})
    assert PiMoELM.load(path).config == TINY


def _rewrite_header(path, edit) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_a_crafted_vocab_size_is_rejected_before_allocating(tmp_path) -> None:
    path = tmp_path / "bomb.safetensors"
    _model().save(path)

    def huge_vocab(header: dict) -> None:
        config = json.loads(header["__metadata__"]["pimoe.LMConfig"])
        config["vocab_size"] = 10**12  # 10^12 x 32 floats: far beyond memory
        header["__metadata__"]["pimoe.LMConfig"] = json.dumps(config)

    _rewrite_header(path, huge_vocab)
    with pytest.raises(ValueError, match="shape"):
        PiMoELM.load(path)


def test_tampered_or_non_finite_weights_are_detected(tmp_path) -> None:
    model = _model()
    path = tmp_path / "lm.safetensors"
    model.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # flip one bit of the last weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        PiMoELM.load(path)
    assert isinstance(PiMoELM.load(path, verify=False), PiMoELM)  # opt-out for speed
    with torch.no_grad():
        model.norm_f.weight[0] = float("nan")
    model.save(path)
    with pytest.raises(ValueError, match="non-finite"):
        PiMoELM.load(path)
