"""Router training of split-upcycled models, and saving/loading the routers."""

from __future__ import annotations

import pytest
import torch
from test_upcycle import LAYERS, logits, tiny_llama, tokens

from pimoe.models.router_training import (
    _fit_gate,
    _shares,
    expert_outputs,
    load_routers,
    routing_quality,
    save_routers,
    train_routers,
)
from pimoe.models.upcycle import moe_layers, upcycle
from pimoe.models.upcycle_cluster import capture_mlp_inputs
from pimoe.moe import set_balance


def _split(top_k: int = 2):
    model = tiny_llama()
    train = capture_mlp_inputs(model, tokens(8, 32, seed=1))
    heldout = capture_mlp_inputs(model, tokens(4, 32, seed=2))
    upcycle(model, 4, top_k, "split", mlp_inputs=train)
    return model, train, heldout


def test_router_training_lowers_the_loss_and_beats_a_random_router() -> None:
    model, train, heldout = _split()
    before = [routing_quality(layer, x) for layer, x in zip(moe_layers(model), heldout)]
    reports = train_routers(model, train, heldout, steps=100)
    assert len(reports) == LAYERS
    for report, (recall0, error0, _, _) in zip(reports, before):
        assert report.loss_end < report.loss_start - 0.01
        assert report.heldout_recall > recall0 and report.heldout_rel_error < error0
        assert report.oracle_rel_error <= report.heldout_rel_error + 1e-6


def test_saved_routers_rebuild_the_same_model(tmp_path) -> None:
    model, train, _ = _split()
    train_routers(model, train, steps=20)
    path = tmp_path / "routers.safetensors"
    save_routers(model, path, {"tokens": 256})
    ids = tokens(2, 16, seed=3)
    rebuilt = tiny_llama()
    assert load_routers(rebuilt, path) == {"tokens": 256}
    torch.testing.assert_close(logits(rebuilt, ids), logits(model, ids))
    four = tiny_llama()
    load_routers(four, path, top_k=4)
    assert [layer.top_k for layer in moe_layers(four)] == [4] * LAYERS
    torch.testing.assert_close(
        logits(four, ids), logits(tiny_llama(), ids), atol=1e-5, rtol=1e-5
    )  # k == E: dense


def test_router_files_are_checked(tmp_path) -> None:
    model, _, _ = _split()
    path = tmp_path / "routers.safetensors"
    with pytest.raises(ValueError, match="split"):
        save_routers(tiny_llama(), path)
    save_routers(model, path)
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]  # one MLP instead of two
    with pytest.raises(ValueError, match="missing|unexpected"):
        load_routers(other, path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_routers(tiny_llama(), path)
    with pytest.raises(ValueError, match="no PiMoE"):
        train_routers(tiny_llama(), [], steps=1)


def test_refit_keeps_all_experts_exact_and_lowers_the_routed_error() -> None:
    from pimoe.models.upcycle_refit import refit_experts

    model, train, _heldout = _split(top_k=4)
    ids = tokens(2, 16, seed=3)
    dense = logits(model, ids)
    before = [layer.experts.w_out.clone() for layer in moe_layers(model)]
    refit_experts(model, train)  # top_k == E: the dense weights are the exact solution
    for layer, w in zip(moe_layers(model), before):
        torch.testing.assert_close(layer.experts.w_out, w, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(logits(model, ids), dense, atol=1e-4, rtol=1e-4)

    model, train, _heldout = _split(top_k=1)
    train_routers(model, train, steps=50)
    error_before = [routing_quality(layer, x)[1] for layer, x in zip(moe_layers(model), train)]
    errors = refit_experts(model, train)
    assert all(after < 0.9 * b for after, b in zip(errors, error_before))
    with pytest.raises(ValueError, match="ridge"):
        refit_experts(model, train, ridge=0.0)


def test_router_training_with_a_selection_bias_balances_the_choice() -> None:
    imbalance = {}
    for balance in ("none", "bias"):
        model, train, heldout = _split()
        reports = train_routers(
            model, train, heldout, steps=100, balance=balance, bias_update_rate=0.003
        )
        assert all(r.heldout_imbalance >= 1.0 for r in reports)
        layers = moe_layers(model)
        assert all(
            (layer.router.e_score_correction_bias is not None) == (balance == "bias")
            for layer in layers
        )
        # the bias balances the tokens it was updated on (128 held-out tokens are too few to tell)
        imbalance[balance] = [routing_quality(layer, x)[3] for layer, x in zip(layers, train)]
    assert all(b < n - 0.1 and b < 1.05 for b, n in zip(imbalance["bias"], imbalance["none"]))
    with pytest.raises(ValueError, match="balance"):
        train_routers(model, train, steps=1, balance="switch")


def test_router_training_shows_one_progress_display_over_the_layers(capsys) -> None:
    model, train, _ = _split()
    train_routers(model, train, steps=3, progress=True)
    lines = capsys.readouterr().out.splitlines()
    # without a terminal: the start line and the end line of one display counting the layers
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"train routers: 0/{LAYERS}")
    assert lines[1].startswith(f"train routers: done, {LAYERS} in") and "loss" in lines[1]


def test_heldout_report_chooses_the_experts_the_biased_router_runs() -> None:
    model, _, heldout = _split()
    for layer, x in zip(moe_layers(model), heldout):
        plain = routing_quality(layer, x)[3]
        set_balance(layer, "bias")
        router = layer.router.eval()
        assert router.e_score_correction_bias is not None
        router.e_score_correction_bias.copy_(torch.tensor([0.3, 0.0, 0.0, -0.3]))
        ran = router(x).indices
        counts = torch.bincount(ran.reshape(-1), minlength=layer.num_experts).float()
        imbalance = routing_quality(layer, x)[3]
        assert imbalance == pytest.approx(float(counts.max() / counts.mean()))
        assert imbalance != pytest.approx(plain)  # the bias changed the choice


def test_gate_fit_reports_the_load_of_each_step() -> None:
    model, train, _ = _split()
    layer, x = moe_layers(model)[0], train[0].float()
    target = _shares(expert_outputs(layer, x))
    first = torch.bincount(layer.router(x).indices.reshape(-1), minlength=layer.num_experts)
    loads: list[torch.Tensor] = []
    _, bias, _ = _fit_gate(layer, x, target, 5, 1e-2, "bias", 0.0, 0.01, loads)
    assert len(loads) == 5 and all(int(load.sum()) == x.shape[0] * layer.top_k for load in loads)
    assert torch.equal(loads[0], first)  # step 0: the initial gate, no bias yet
    # the bias is the sum of the sign updates of the reported loads
    expected = sum(0.01 * torch.sign(load.float().mean() - load.float()) for load in loads)
    torch.testing.assert_close(bias, expected)
