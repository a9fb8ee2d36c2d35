"""Tests of the PiMoE language model (pimoe.moe.model) and the byte-level text data."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from pimoe.data import byte_splits, get_batch, load_pydoc_text
from pimoe.demo import loss_curve, train_lm
from pimoe.moe.config import MoEConfig
from pimoe.moe.layer import PiMoE
from pimoe.moe.model import LMConfig, PiMoELM
from pimoe.moe.stats import RoutingStats

TINY = LMConfig(
    block_size=16,
    n_layer=2,
    n_head=2,
    d_model=32,
    moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
)


def make_model(config: LMConfig = TINY, seed: int = 0) -> PiMoELM:
    torch.manual_seed(seed)
    return PiMoELM(config)


def batch(
    config: LMConfig = TINY, batch_size: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_output_shapes_and_loss_terms() -> None:
    model = make_model()
    x, y = batch()
    out = model(x, y)
    assert out.logits.shape == (3, 16, 256)
    assert out.loss is not None and out.ce_loss is not None
    assert out.loss.shape == out.aux_loss.shape == out.z_loss.shape == ()
    # Near-uniform predictions at init: CE close to log(256).
    assert abs(out.ce_loss.item() - math.log(256)) < 0.1
    # Two MoE layers, each load-balancing loss is >= 1 (1 when perfectly balanced).
    assert out.aux_loss.item() >= 2.0 - 1e-5
    no_targets = model(x)
    assert no_targets.loss is None and no_targets.ce_loss is None
    torch.testing.assert_close(no_targets.logits, out.logits)


def test_total_loss_includes_weighted_aux_and_z_losses() -> None:
    config = replace(TINY, moe=TINY.moe.replace(aux_loss_coef=0.5, z_loss_coef=0.25))
    out = make_model(config)(*batch())
    expected = out.ce_loss + 0.5 * out.aux_loss + 0.25 * out.z_loss
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("term", ["aux_loss", "z_loss"])
def test_router_losses_reach_every_router(term: str) -> None:
    model = make_model()
    getattr(model(*batch()), term).backward()
    gates = [layer.router.gate.weight for layer in model.moe_layers]
    assert len(gates) == 2
    for gate in gates:
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    # The last layer's router sees its input before its experts run: they get no gradient.
    assert all(p.grad is None for p in model.moe_layers[-1].experts.parameters())


def test_total_loss_gradient_changes_with_aux_coefficient() -> None:
    grads = []
    for coef in (0.0, 1.0):
        model = make_model(replace(TINY, moe=TINY.moe.replace(aux_loss_coef=coef, z_loss_coef=0.0)))
        model(*batch()).loss.backward()
        grads.append(model.moe_layers[0].router.gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_overfits_a_repeated_batch() -> None:
    model = make_model()
    x, y = batch(batch_size=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_dense_twin_has_the_same_active_params() -> None:
    """Active params of the MoE model = those of its dense twin + the router gates, exactly."""
    for config in (
        TINY,
        replace(TINY, moe_every=2, n_layer=4),
        replace(TINY, moe=TINY.moe.replace(shared_experts=1)),
    ):
        moe, dense = make_model(config), make_model(config.dense_twin())
        n_moe = len(moe.moe_layers)
        assert n_moe == config.n_layer // config.moe_every and not dense.moe_layers
        gates = n_moe * config.d_model * config.moe.num_experts
        assert moe.num_params(active=True) == dense.num_params(active=True) + gates
        assert dense.num_params(active=True) == dense.num_params()
        # Total: the skipped experts are stored but not used per token.
        per_expert = 3 * config.d_model * config.ffn_dim
        skipped = n_moe * (config.moe.num_experts - config.moe.top_k) * per_expert
        assert moe.num_params() == moe.num_params(active=True) + skipped


def test_tied_head_is_counted_once() -> None:
    model = make_model()
    assert model.lm_head.weight is model.tok_emb.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())


def test_dense_model_has_zero_router_losses() -> None:
    out = make_model(TINY.dense_twin())(*batch())
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.ce_loss)
    assert make_model(TINY.dense_twin()).routing_stats() == []


def test_routing_stats_per_layer() -> None:
    model = make_model()
    with pytest.raises(RuntimeError, match="forward"):
        model.routing_stats()
    model(batch()[0])
    stats = model.routing_stats()
    assert len(stats) == 2 and all(isinstance(s, RoutingStats) for s in stats)
    for s in stats:
        assert s.num_tokens == 3 * 16
        assert int(s.tokens_per_expert.sum()) == 3 * 16 * TINY.moe.top_k  # dropless


def test_save_load_round_trip(tmp_path) -> None:
    model = make_model(replace(TINY, moe_every=2)).eval()
    path = tmp_path / "lm.safetensors"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lm.safetensors"]  # no temp file left
    loaded = PiMoELM.load(path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    x, _ = batch()
    assert torch.equal(loaded.eval()(x).logits, model(x).logits)


def test_load_rejects_bad_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match="safetensors"):
        PiMoELM.load(garbage)
    no_meta = tmp_path / "no_meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_meta))
    with pytest.raises(ValueError, match="metadata"):
        PiMoELM.load(no_meta)
    bad_config = tmp_path / "bad_config.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_config), metadata={"pimoe.LMConfig": "{oops"})
    with pytest.raises(ValueError, match="invalid"):
        PiMoELM.load(bad_config)
    wrong_weights = tmp_path / "wrong.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(wrong_weights),
        metadata={"pimoe.LMConfig": json.dumps({"d_model": 32, "n_head": 2})},
    )
    with pytest.raises(ValueError, match="unexpected tensor"):
        PiMoELM.load(wrong_weights)
    with pytest.raises(FileNotFoundError):
        PiMoELM.load(tmp_path / "missing.safetensors")


def test_generate_length_range_and_determinism() -> None:
    model = make_model().eval()
    prompt = torch.tensor([[84, 104, 101, 32], [0, 1, 2, 3]])
    out = model.generate(prompt, 20, top_k=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 24) and out.dtype == torch.long
    assert torch.equal(out[:, :4], prompt)
    assert out.min() >= 0 and out.max() < 256
    again = model.generate(prompt, 20, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # Longer than block_size: the context is cropped, generation goes on.
    long = model.generate(prompt, TINY.block_size + 4, temperature=0)
    assert long.shape == (2, 4 + TINY.block_size + 4)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    """Token-choice dropless routing is per token, so the whole MoE model is causal."""
    model = make_model().eval()
    x, _ = batch(batch_size=2)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 256
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_bad_inputs() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="long"):
        model(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="n_head"):
        LMConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="top_k"):
        LMConfig(moe=MoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="moe_every"):
        LMConfig(moe_every=-1)


def test_moe_every_places_moe_blocks() -> None:
    model = make_model(replace(TINY, n_layer=4, moe_every=2))
    kinds = [isinstance(block.ffn, PiMoE) for block in model.blocks]
    assert kinds == [False, True, False, True]
    assert replace(TINY, moe_every=2).dense_twin().dense_width == TINY.moe.top_k * TINY.ffn_dim


def test_pydoc_text_and_splits() -> None:
    text = load_pydoc_text()
    assert 400_000 < len(text) < 600_000 and text == load_pydoc_text()
    train, val = byte_splits(text)
    assert train.dtype == val.dtype == torch.long
    assert len(train) + len(val) == len(text) and len(val) == int(0.1 * len(text))
    assert bytes(val[-50:].tolist()) == text[-50:]  # contiguous: the held-out part is the end
    assert int(train.max()) < 256 and int(train.min()) >= 0
    with pytest.raises(ValueError, match="val_fraction"):
        byte_splits(text, val_fraction=1.0)


def test_get_batch_is_deterministic_and_shifted() -> None:
    data = torch.arange(1000)
    x1, y1 = get_batch(data, 8, 32, torch.Generator().manual_seed(3))
    x2, y2 = get_batch(data, 8, 32, torch.Generator().manual_seed(3))
    x3, _ = get_batch(data, 8, 32, torch.Generator().manual_seed(4))
    assert x1.shape == y1.shape == (8, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1, x1 + 1)  # targets are the next tokens
    assert torch.equal(x1[:, 1:] - x1[:, :-1], torch.ones(8, 31, dtype=torch.long))  # windows
    with pytest.raises(ValueError, match="block_size"):
        get_batch(torch.arange(10), 2, 10, torch.Generator())


def test_train_lm_records_curves_and_routing() -> None:
    data = torch.arange(2000) % 7  # a periodic byte sequence: easy to learn
    result = train_lm(
        TINY,
        data[:1800],
        data[1800:],
        steps=60,
        batch_size=4,
        lr=1e-2,
        device="cpu",
        seed=0,
        progress=False,
    )
    assert len(result.losses) == len(result.ce) == len(result.aux) == 60
    assert result.ce[-1] < 0.5 * result.ce[0] and result.val_loss < 0.5 * result.ce[0]
    assert result.tokens_per_s > 0
    assert len(result.routing) == 2
    assert all(s.num_tokens == 20 * 4 * TINY.block_size for s in result.routing)  # last 20 steps
    assert list(loss_curve(list(range(100)))) == ["0-10%", "20-30%", "45-55%", "70-80%", "90-100%"]
    assert loss_curve([float(i) for i in range(100)])["0-10%"] == 4.5
