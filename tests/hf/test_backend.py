"""experts_implementation="pimoe" equals transformers' eager experts, family by family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from pimoe.hf import (
    backend,
    enable,
)
from pimoe.hf.families import FAMILIES, build_tiny, compare_implementations
from pimoe.moe import backends

LOGIT_TOL = 1e-4
GRAD_RTOL = 1e-5  # of the largest gradient entry (~1e2..1e3 with loss = sum of squared logits)


def _input_ids(model: nn.Module, tokens: int = 48) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (2, tokens // 2), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_grads_equal_eager(family: str) -> None:
    model = build_tiny(family)
    diff = compare_implementations(model, _input_ids(model))["pimoe"]
    assert diff["max_abs_logit"] > 0.5  # a model whose logits are not all ~0
    assert diff["max_abs_logit_diff"] <= LOGIT_TOL
    assert diff["max_abs_grad_diff"] <= GRAD_RTOL * diff["max_abs_grad"]


def test_the_checks_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutants of the backend (no input bias; GPT-OSS without its clamp) break the equivalence."""
    model = build_tiny("gpt_oss")
    ids = _input_ids(model)
    layout = backend.experts_layout

    monkeypatch.setattr(backend, "experts_layout", lambda e: layout(e)._replace(b_in=None))
    assert compare_implementations(model, ids)["pimoe"]["max_abs_logit_diff"] > 1e-2

    def unclamped(experts: nn.Module) -> backend.ExpertsLayout:
        def act(h: torch.Tensor) -> torch.Tensor:
            gate, up = h[..., ::2], h[..., 1::2]
            return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)

        return layout(experts)._replace(act=act)

    monkeypatch.setattr(backend, "experts_layout", unclamped)
    assert compare_implementations(model, ids)["pimoe"]["max_abs_logit_diff"] > 1e-2


def test_pimoe_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered name really reaches pimoe's kernel (no fallback to another backend)."""
    calls = []
    kernel = backend.grouped_ffn
    monkeypatch.setattr(backend, "grouped_ffn", lambda *a: calls.append(1) or kernel(*a))
    model = build_tiny("mixtral")
    model.set_experts_implementation("pimoe")
    model(input_ids=_input_ids(model))
    assert len(calls) == model.config.num_hidden_layers


def test_enable_is_idempotent_and_from_pretrained_selects_it(tmp_path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    enable()
    enable()
    assert ALL_EXPERTS_FUNCTIONS["pimoe"] is backend.pimoe_experts_forward
    build_tiny("qwen3_moe").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="pimoe")
    assert model.config._experts_implementation == "pimoe"


def _module_equal(
    experts: nn.Module, num_tokens: int = 40, top_k: int = 2, sentinel: bool = False
) -> None:
    """One experts module: pimoe vs its eager forward, outputs and all gradients."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.3)
    d = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
    x = torch.randn(num_tokens, d)
    scores = torch.randn(num_tokens, experts.num_experts)
    index = scores.topk(top_k, dim=-1).indices
    weights = scores.gather(1, index).softmax(-1)
    if sentinel:  # expert parallelism: another rank's experts are marked num_experts, weight 0
        experts._is_expert_parallel = True
        index[::3, 0] = experts.num_experts
        weights[::3, 0] = 0.0
    results = {}
    for name in ("eager", "pimoe"):
        experts.config._experts_implementation = name
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = experts(xi, index, weights)
        out.square().sum().backward()
        results[name] = (out.detach(), xi.grad, {n: p.grad for n, p in experts.named_parameters()})
    (out_e, gx_e, g_e), (out_p, gx_p, g_p) = results["eager"], results["pimoe"]
    assert out_e.abs().max() > 1e-2
    torch.testing.assert_close(out_p, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_p, gx_e, rtol=1e-5, atol=1e-5)
    for name, grad in g_e.items():
        torch.testing.assert_close(g_p[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_layout_without_gate_relu2() -> None:
    """has_gate=False: up_proj and the family's act_fn (NemotronH: squared ReLU)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = NemotronHConfig(
        n_routed_experts=6, hidden_size=16, moe_intermediate_size=12, mlp_hidden_act="relu2"
    )
    _module_equal(NemotronHExperts(config))


def test_layout_post_expert_norm() -> None:
    from transformers.models.muse_spark.configuration_muse_spark import (
        MuseSparkTextConfig,
    )
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    config = MuseSparkTextConfig(num_local_experts=6, moe_hidden_size=16, moe_intermediate_size=12)
    _module_equal(MuseSparkExperts(config))


def test_layout_transposed_without_bias() -> None:
    from transformers.models.aria.configuration_aria import AriaTextConfig
    from transformers.models.aria.modeling_aria import AriaExperts

    config = AriaTextConfig(
        moe_num_experts=6, hidden_size=16, intermediate_size=12, num_attention_heads=4
    )
    _module_equal(AriaExperts(config))


def test_expert_parallel_sentinels_are_skipped() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        num_local_experts=6, hidden_size=16, intermediate_size=12, num_attention_heads=4
    )
    _module_equal(MixtralExperts(config), sentinel=True)


def test_unsupported_experts_raise_naming_the_family() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    experts = MixtralExperts(
        MixtralConfig(
            num_local_experts=4, hidden_size=8, intermediate_size=6, num_attention_heads=2
        )
    )
    experts.weight_scale_inv = nn.Parameter(torch.ones(4))  # e.g. an FP8 checkpoint's scales
    with pytest.raises(TypeError, match="MixtralExperts.*weight_scale_inv"):
        backend.experts_layout(experts)
    del experts.weight_scale_inv
    experts.down_proj = nn.Parameter(torch.zeros(4, 8, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="MixtralExperts.*torch.int8"):
        backend.experts_layout(experts)
    with pytest.raises(TypeError, match="Linear is not a transformers experts module"):
        backend.experts_layout(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bfloat16_matches_eager_to_rounding(family: str) -> None:
    """In bf16 the median logit differs from eager by at most one bf16 ulp at the logits' scale
    and at most 5% of the tokens by more than 4 ulps (a near-tie in a router can flip an expert
    choice under a different rounding order; transformers' grouped_mm flips the same Mixtral
    token here)."""
    model = build_tiny(family).to(torch.bfloat16)
    ids = _input_ids(model)
    logits = {}
    with torch.no_grad():
        for name in ("eager", "pimoe"):
            model.set_experts_implementation(name)
            logits[name] = model(input_ids=ids).logits.float()  # [B, S, V]
    ulp = 2.0 ** (torch.tensor(logits["eager"].abs().max().item()).log2().floor().item() - 7)
    diff = (logits["pimoe"] - logits["eager"]).abs()
    assert diff.median().item() <= ulp
    assert (diff.amax(-1) > 4 * ulp).float().mean().item() <= 0.05


@pytest.mark.parametrize(("family", "threads"), [("mixtral", 1), ("mixtral", 2), ("gpt_oss", 1)])
def test_padding_follows_the_kernel_rule(
    monkeypatch: pytest.MonkeyPatch, family: str, threads: int
) -> None:
    """The transformers backend pads exactly as pimoe's own experts do
    (:func:`pimoe.moe.experts.kernel_pad_limit`): not on one thread where ``grouped_mm`` runs,
    nor on several where the threaded kernel runs (else within 1.25x rows), up to 2x where
    neither can run (GPT-OSS's biases)."""
    from pimoe.moe import dispatch

    limits: list[float | None] = []
    real_plan = backend.plan_dispatch
    monkeypatch.setattr(backend, "plan_dispatch", lambda *a: limits.append(a[3]) or real_plan(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    model = build_tiny(family)
    model.set_experts_implementation("pimoe")
    with torch.no_grad():
        model(input_ids=_input_ids(model, 8))
    from pimoe.moe.threaded import threaded_kernel

    expected = (
        dispatch.PAD_LIMIT
        if family == "gpt_oss"
        else (None if threaded_kernel() is not None else dispatch.PAD_LIMIT_VS_GROUPED_MM)
        if threads > 1
        else None
    )
    assert limits and set(limits) == {expected}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_where_auto_picks_grouped_mm_the_exact_rows_run_it(
    monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """Where ``MoEConfig(backend="auto")`` runs grouped_mm (bf16 on CUDA), the transformers
    backend does too: one grouped_mm FFN on the unpadded rows, logits and gradients of eager
    (forced here on the CPU, in fp32)."""
    calls: list[int] = []

    def spy(x: torch.Tensor, counts: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append(int(counts.sum()))
        assert x.shape[0] == calls[-1]  # no padding rows
        return backends.grouped_mm_ffn(x, counts, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "auto_backend", lambda weight: "grouped_mm")
    monkeypatch.setattr(backend, "grouped_mm_ffn", spy)
    model = build_tiny(family)
    diff = compare_implementations(model, _input_ids(model))["pimoe"]
    assert len(calls) == model.config.num_hidden_layers
    assert diff["max_abs_logit_diff"] <= LOGIT_TOL
    assert diff["max_abs_grad_diff"] <= GRAD_RTOL * diff["max_abs_grad"]


def test_older_transformers_are_refused_naming_the_version() -> None:
    backend.check_transformers_version(backend.MIN_TRANSFORMERS)
    backend.check_transformers_version("6.0.0")
    with pytest.raises(ImportError, match=r"transformers>=5\.24 \(found 5\.17\.0\)"):
        backend.check_transformers_version("5.17.0")
