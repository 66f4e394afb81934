"""Tiny random transformers checkpoints for the import tests, built with transformers' own classes
and save_pretrained (OLMo-2 and FlexOlmo, with or without grouped-query attention), and the checks
that compare flexkern with them."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from flexkern.flexolmo.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer
from synthetic import synthetic_docs

WORDS = "the a of and to in is was river city king war year people north def return import class self x"
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32, rms_norm_eps=1e-6)  # OLMo-2 and FlexOlmo alike


def make_tokenizer(path) -> Path:
    return save_tokenizer(train_tokenizer(synthetic_docs(WORDS, 80, 0), vocab_size=300), path)


def vocab(tok_path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_path)).get_vocab_size()


def _common(tok_path, kv_heads, tied, vocab_pad=0, **over) -> dict:
    return dict(SIZES, vocab_size=vocab(tok_path) + vocab_pad, num_key_value_heads=kv_heads, pad_token_id=None,
                bos_token_id=None, eos_token_id=0, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **over)


def randomize(model, std=0.2):
    """Weights larger than the init (and norms away from one) so every tensor shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, std)
    return model


def save_with_tokenizer(model, path, tok_path, dtype=torch.float32):
    import transformers
    from tokenizers import Tokenizer

    model.to(dtype).save_pretrained(path)
    model.float()
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_path)), eos_token=EOS_TOKEN)
    t.save_pretrained(path)
    return model.eval()


def olmo2(tok_path, kv_heads=2, tied=False, **over):
    import transformers

    cfg = transformers.Olmo2Config(**_common(tok_path, kv_heads, tied, **over))
    return randomize(transformers.Olmo2ForCausalLM(cfg).eval())


def flexolmo(tok_path, experts=2, top_k=2, kv_heads=2, tied=False, **over):
    import transformers

    cfg = transformers.FlexOlmoConfig(**_common(tok_path, kv_heads, tied, **over), num_experts=experts,
                                      num_experts_per_tok=top_k)
    return randomize(transformers.FlexOlmoForCausalLM(cfg).eval())


@torch.no_grad()
def owner_of(public, tok_path, r_pub, seed, *, top_k=2):
    """A FlexOlmo 2-expert owner model as FlexOlmo's owners train it from ``public`` (an
    Olmo2ForCausalLM): every shared tensor and expert 0 (the public FFN) copied from it, router row 0
    = ``r_pub``; expert 1 and its row random (``seed``)."""
    kv = public.config.num_key_value_heads
    owner = flexolmo(tok_path, experts=2, top_k=top_k, kv_heads=kv, tied=public.config.tie_word_embeddings)
    g = torch.Generator().manual_seed(seed)
    dense = public.state_dict()
    state = owner.state_dict()
    for k in state:
        if k in dense:
            state[k].copy_(dense[k])
    for i in range(public.config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        gate_up, down = state[f"{mlp}.experts.gate_up_proj"], state[f"{mlp}.experts.down_proj"]
        gate_up[0] = torch.cat([dense[f"{mlp}.gate_proj.weight"], dense[f"{mlp}.up_proj.weight"]])
        down[0] = dense[f"{mlp}.down_proj.weight"]
        gate_up[1] = torch.randn(gate_up[1].shape, generator=g) * 0.2
        down[1] = torch.randn(down[1].shape, generator=g) * 0.2
        state[f"{mlp}.gate.weight"][0] = r_pub
        state[f"{mlp}.gate.weight"][1] = torch.randn(r_pub.shape, generator=g)
    return owner


def check_vs_transformers(model, ref, ids):
    """flexkern's error (fp32) vs transformers in fp64 <= 2 x transformers' own fp32 error + a few ulps."""
    if getattr(ref.config, "num_experts", None):
        ref.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
        oracle = ref.double()(ids).logits
    ref.float()
    floor = 8 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    err, own = (got.double() - oracle).abs().max().item(), (want.double() - oracle).abs().max().item()
    assert err <= 2 * own + floor, f"flexkern error {err:.3g} vs transformers' own {own:.3g} (floor {floor:.3g})"


def safetensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
