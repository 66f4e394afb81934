"""experts_implementation="flexkern" in transformers: same logits, tokens and gradients as "eager"
on tiny random FlexOlmo / OLMoE / Mixtral / Qwen3-MoE models; weights read in place; clear refusals;
torch.compile. (Checkpoint export/import: tests/test_hf_checkpoint.py.)"""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")
fkt = pytest.importorskip("flexkern.integrations.transformers")
import flexkern.ops  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

V, D, F, L, H = 64, 32, 48, 2, 2


def _config(kind: str, layers: int = L):
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=H,
                  max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=1,
                  tie_word_embeddings=False)
    if kind == "flex_olmo":
        return transformers.FlexOlmoConfig(**common, intermediate_size=F, num_experts=4, num_experts_per_tok=2)
    if kind == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=F, num_experts=4, num_experts_per_tok=2)
    if kind == "mixtral":  # renormalised top-k, float32 routing weights next to the model dtype
        return transformers.MixtralConfig(**common, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=2 * F, moe_intermediate_size=F, num_experts=4,
                                           num_experts_per_tok=2, norm_topk_prob=True, head_dim=D // H,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    raise ValueError(kind)


KINDS = ["flex_olmo", "olmoe", "mixtral", "qwen3_moe"]


def _model(kind: str, dtype=torch.float32, layers: int = L):
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, layers), dtype=dtype).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the experts matter in the logits
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    return model


def _set(model, impl: str):
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    return model


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _check(got, torch32, oracle64, what):
    """err(flexkern, fp32) <= 2 * err(eager, fp32) + a few-ulp floor, both against eager in fp64."""
    floor = 8 * torch.finfo(torch.float32).eps * oracle64.abs().max().item()
    err, ref = _max_err(got, oracle64), _max_err(torch32, oracle64)
    assert err <= 2 * ref + floor, f"{what}: flexkern error {err:.3g} vs eager's own {ref:.3g} (floor {floor:.3g})"


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["flexkern"] is fkt.flexkern_experts_forward
    assert fkt.register() == "flexkern"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_eager(kind):
    model = _model(kind)
    ids = torch.randint(0, V, (2, 11))
    assert fkt.unsupported_experts(model) == {}
    with torch.no_grad():
        got = _set(model, "flexkern")(ids).logits
        eager32 = _set(model, "eager")(ids).logits
        oracle = _set(model.double(), "eager")(ids).logits
    _check(got, eager32, oracle, f"{kind} logits")


@pytest.mark.parametrize("kind", KINDS)
def test_generate_same_tokens(kind):
    model = _model(kind)
    ids = torch.randint(2, V, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    a = _set(model, "flexkern").generate(ids, **kw)
    b = _set(model, "eager").generate(ids, **kw)
    assert a.shape == (2, 11)
    assert torch.equal(a, b)


def _grads(model, ids, proj):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * proj.to(logits.dtype)).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_eager(kind):
    model = _model(kind).train()
    ids = torch.randint(0, V, (2, 9))
    proj = torch.randn(2, 9, V, dtype=torch.float64)
    got = _grads(_set(model, "flexkern"), ids, proj)
    eager32 = _grads(_set(model, "eager"), ids, proj)
    oracle = _grads(_set(model.double(), "eager"), ids, proj)
    names = [n for n, _ in model.named_parameters()]
    assert set(got) == set(oracle) == set(names), "every parameter gets a gradient"
    for n in names:
        _check(got[n], eager32[n], oracle[n], f"{kind} d/d {n}")
    assert any("gate_up_proj" in n for n in names) and any(".gate.weight" in n for n in names)


def test_bf16_model():
    """bf16 hidden states with float32 (Mixtral) routing weights: bf16 outputs and gradients, with
    eager-sized errors. One layer: with two, bf16 rounding differences in the first layer's output
    can flip a near-tie in the second layer's top-k (a different expert, not an error)."""
    model = _model("mixtral", layers=1).train()
    ids = torch.randint(0, V, (2, 7))
    proj = torch.randn(2, 7, V, dtype=torch.float64)
    oracle = _grads(_set(model.double(), "eager"), ids, proj)
    with torch.no_grad():
        logits64 = model(ids).logits
    model.to(torch.bfloat16)
    got, eager = _grads(_set(model, "flexkern"), ids, proj), _grads(_set(model, "eager"), ids, proj)
    with torch.no_grad():
        logits = {impl: _set(model, impl)(ids).logits for impl in ("flexkern", "eager")}
    assert logits["flexkern"].dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps

    def check(a, b, ref, what):
        assert a.dtype == b.dtype
        floor = 4 * eps * ref.abs().max().item()
        assert _max_err(a, ref) <= 2 * _max_err(b, ref) + floor, what

    check(logits["flexkern"], logits["eager"], logits64, "bf16 logits")
    for n in oracle:
        check(got[n], eager[n], oracle[n], f"bf16 d/d {n}")


def test_import_flexkern_needs_no_transformers():
    import subprocess
    import sys

    code = ("import sys, flexkern, flexkern.integrations, flexkern.flexolmo.hf, flexkern.nn; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- weights read in place ------------------------------------------------------------------------------
class _ExpertsSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the weight tensors that reach flexkern's experts op, and every copying aten op
    (clone / contiguous / to / copy_) whose source shares storage with ``watch``."""

    COPIES = ("aten.clone", "aten._to_copy", "aten.copy_", "aten.contiguous")

    def __init__(self, watch=()):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watch}
        self.weights, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "flexkern.experts_swiglu.default" in name:
            self.weights.append(tuple(args[1:4]))
        if name.startswith(self.COPIES):
            src = [a for a in args if isinstance(a, torch.Tensor)]
            if any(a.untyped_storage().data_ptr() in self.storages for a in src):
                self.copies.append(name)
        return func(*args, **(kwargs or {}))


@use_experts_implementation(is_transposed=True)
class TransposedExperts(nn.Module):
    """A transposed-layout experts module (gate_up (E, D, 2F), down (E, F, D)), as Aria's."""

    def __init__(self, config, E=3):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * F) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(E, F, D) * 0.2)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):  # eager: per-token loop
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                gate, up = (hidden_states[t] @ self.gate_up_proj[e]).chunk(2, dim=-1)
                out[t] += top_k_weights[t, k] * ((self.act_fn(gate) * up) @ self.down_proj[e])
        return out


def _cfg(impl):
    cfg = transformers.PreTrainedConfig()
    cfg._experts_implementation = impl
    return cfg


def _routing(T, E, K=2, dtype=torch.float32):
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    return idx, torch.rand(T, K, dtype=dtype)


def _views_of(weights, module):
    """The weights that reached the op are views into the module's own storage."""
    gate_up, down = module.gate_up_proj, module.down_proj
    base = gate_up.untyped_storage().data_ptr()
    return all(w.untyped_storage().data_ptr() == base for w in weights[:2]) and \
        weights[2].untyped_storage().data_ptr() == down.untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", ["fused", "transposed"])
def test_weights_reach_the_op_as_views(layout):
    if layout == "fused":
        module = _model("flex_olmo").model.layers[0].mlp.experts
        module.config._experts_implementation = "flexkern"
    else:
        module = TransposedExperts(_cfg("flexkern"))
    E, Fw = module.num_experts, module.gate_up_proj.shape[-1 if layout == "transposed" else 1] // 2
    x = torch.randn(5, D)
    idx, w = _routing(5, E)
    with _ExpertsSpy() as spy:
        module(x, idx, w)
    [(gate, up, down)] = spy.weights
    assert gate.shape == up.shape == (E, Fw, D) and down.shape == (E, D, Fw)
    assert _views_of((gate, up, down), module), "the op got views of the module's weights"
    # offsets inside the fused tensor: gate at 0, up F rows (or columns) further
    elt = module.gate_up_proj.element_size()
    step = Fw * elt if layout == "transposed" else Fw * D * elt
    assert up.data_ptr() - gate.data_ptr() == step


@pytest.mark.parametrize("layout", ["fused", "transposed"])
def test_no_weight_copy(layout):
    """Neither the call into the op nor the reference backend inside it copies the weights.
    (Needs experts_swiglu to accept strided weights as they are; it used to make them contiguous.)"""
    if layout == "fused":
        module = _model("flex_olmo").model.layers[0].mlp.experts
        module.config._experts_implementation = "flexkern"
    else:
        module = TransposedExperts(_cfg("flexkern"))
    watch = (module.gate_up_proj, module.down_proj)
    x = torch.randn(6, D)
    idx, w = _routing(6, module.num_experts)
    with _ExpertsSpy(watch) as spy:
        module(x, idx, w)
    assert len(spy.weights) == 1 and not spy.copies, f"weight copies on the way to the op: {spy.copies}"
    disp = flexkern.ops.dispatch(idx, module.num_experts)
    with _ExpertsSpy(watch) as spy:  # inside: the reference backend on the same views
        flexkern.ops.experts_fwd_ref(x, *fkt.expert_weights(module), *disp.tensors(), w, None)
    assert not spy.copies, f"the reference backend copies the weights: {spy.copies}"
    # and the spy does see a copy when there is one
    with _ExpertsSpy(watch) as spy:
        fkt.expert_weights(module)[0].contiguous()
    assert spy.copies


def test_transposed_layout_matches_eager():
    module = TransposedExperts(_cfg("flexkern")).double()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    idx, w = _routing(7, module.num_experts, dtype=torch.float64)
    w.requires_grad_(True)
    got = module(x, idx, w)
    g_got = torch.autograd.grad(got.sum(), (x, w, module.gate_up_proj, module.down_proj))
    module.config._experts_implementation = "eager"
    ref = module(x, idx, w)
    g_ref = torch.autograd.grad(ref.sum(), (x, w, module.gate_up_proj, module.down_proj))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- refusals ---------------------------------------------------------------------------------------------
def test_refuses_other_activation():
    cfg = _config("olmoe")
    cfg.hidden_act = "gelu"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    bad = fkt.unsupported_experts(model)
    assert set(bad) == {f"model.layers.{i}.mlp.experts" for i in range(L)}
    model.set_experts_implementation("flexkern")
    with pytest.raises(fkt.UnsupportedExpertsError, match="OlmoeExperts.*activation is GELU"):
        model(torch.randint(0, V, (1, 4)))


@pytest.mark.parametrize("flags, match", [
    (dict(has_bias=True), "biases"),
    (dict(has_gate=False), "not gated"),
    (dict(is_concatenated=False), "interleaves"),
    (dict(has_post_expert_norm=True), "norm after each expert"),
])
def test_refuses_other_layouts(flags, match):
    @use_experts_implementation(**flags)
    class OddExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 2
            self.gate_up_proj = nn.Parameter(torch.randn(2, 2 * F, D))
            self.down_proj = nn.Parameter(torch.randn(2, D, F))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("no silent fallback to eager")

    with pytest.raises(fkt.UnsupportedExpertsError, match=f"OddExperts: .*{match}"):
        OddExperts(_cfg("flexkern"))(torch.randn(3, D), *_routing(3, 2, K=1))


def test_refuses_custom_gate_and_bad_shapes():
    @use_experts_implementation
    class ClampedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 2
            self.gate_up_proj = nn.Parameter(torch.randn(2, 2 * F, D))
            self.down_proj = nn.Parameter(torch.randn(2, D, F + 1))  # does not fit
            self.act_fn = nn.SiLU()

        def forward(self, *args):
            raise AssertionError("no silent fallback to eager")

    m = ClampedExperts(_cfg("flexkern"))
    with pytest.raises(fkt.UnsupportedExpertsError, match="ClampedExperts: .*not the layout"):
        m(torch.randn(3, D), *_routing(3, 2, K=1))
    ClampedExperts._apply_gate = lambda self, gu: gu.clamp(max=7).chunk(2, -1)[0]
    with pytest.raises(fkt.UnsupportedExpertsError, match="custom gating"):
        m(torch.randn(3, D), *_routing(3, 2, K=1))


# ---- torch.compile ----------------------------------------------------------------------------------------
def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces the experts call (custom ops with fakes, no graph break),
    with dynamic token counts as in generation; forward and backward equal eager mode's."""
    module = _model("flex_olmo").model.layers[0].mlp.experts
    module.config._experts_implementation = "flexkern"
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (6, 11):
        x = torch.randn(T, D, requires_grad=True)
        idx, w = _routing(T, module.num_experts)
        y = compiled(x, idx, w)
        g = torch.autograd.grad(y.square().sum(), (x, module.gate_up_proj, module.down_proj))
        y_ref = module(x, idx, w)
        g_ref = torch.autograd.grad(y_ref.square().sum(), (x, module.gate_up_proj, module.down_proj))
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the Triton backend (interpreted on the CPU) ----------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("layout", ["fused", "transposed"])
def test_triton_backend_reads_the_views(layout, monkeypatch):
    """The views of the fused / transposed weights through the Triton kernels (forward and
    backward), against eager."""
    pytest.importorskip("triton")
    if "triton" not in flexkern.ops.backend.available("experts_swiglu"):
        pytest.skip("triton backend not registered")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FLEXKERN_BACKEND", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if layout == "fused":
        module = _model("flex_olmo").model.layers[0].mlp.experts.to(dev)
    else:
        module = TransposedExperts(_cfg("eager")).to(dev)
    x = torch.randn(9, D, device=dev)
    idx, w = _routing(9, module.num_experts)
    idx, w = idx.to(dev), w.to(dev)
    with torch.no_grad():
        disp = flexkern.ops.dispatch(idx, module.num_experts)
        decision = flexkern.explain("experts_swiglu", x, *fkt.expert_weights(module), disp, w)
        assert decision.backend == "triton", str(decision)

    def run(impl, dtype):
        module.to(dtype).config._experts_implementation = impl
        xs, ws = (t.detach().to(dtype).requires_grad_(True) for t in (x, w))
        y = module(xs, idx, ws)
        return [y, *torch.autograd.grad(y.square().sum(), (xs, ws, module.gate_up_proj, module.down_proj))]

    got, eager32, oracle = run("flexkern", torch.float32), run("eager", torch.float32), run("eager", torch.float64)
    for what, a, b, c in zip(("y", "dx", "d weights", "d gate_up_proj", "d down_proj"), got, eager32, oracle):
        _check(a, b, c, f"triton {layout} {what}")
