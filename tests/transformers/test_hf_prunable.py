"""One meaning of "prunable" on the Hugging Face families of the transformers tests (issue 19.4), in eager and
SDPA attention: ``unit_masks`` (every set it offers) and ``head_masks`` at 30 % -> ``shrink`` neither refuses, nor
fixes a conflict, nor keeps a masked channel -> the shrunk output equals the ``as_pruned`` masked model's
(rtol 1e-4) -> the shrunk model's dense count equals the effective count of the masks (MACs and params).
Tiny configurations, random weights."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope import (  # noqa: E402
    count_flops_params,  # noqa: E402
    head_masks,
    unit_masks,
)
from prunescope.graph import trace  # noqa: E402
from prunescope.masks.layers import is_transposed_linear  # noqa: E402
from prunescope.narrow import ShrinkWarning, as_pruned, shrink  # noqa: E402

IDS = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))}


def _model(kind: str, attn: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, attn_implementation=attn)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, max_position_embeddings=32, **common)
        return transformers.BertModel(cfg), IDS
    gqa = {**common, "num_attention_heads": 8, "num_key_value_heads": 4}  # 4 kv groups of 2 query heads
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, max_position_embeddings=32, **gqa)
        return transformers.LlamaModel(cfg), IDS
    if kind == "mistral":
        cfg = transformers.MistralConfig(vocab_size=50, hidden_size=32, max_position_embeddings=32,
                                         sliding_window=4, **gqa)
        return transformers.MistralModel(cfg), IDS
    if kind == "vit":
        cfg = transformers.ViTConfig(hidden_size=16, image_size=8, patch_size=4, **common)
        return transformers.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 8, 8)}
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32, n_inner=24,
                                  attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg), IDS


def _out(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).last_hidden_state


@pytest.mark.parametrize("which", ["units", "heads"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "mistral", "vit"])
def test_offered_units_shrink_as_pruned(kind: str, attn: str, which: str, one_thread: None) -> None:
    model, x = _model(kind, attn)
    model.eval()
    g = trace(model, x)
    make = unit_masks if which == "units" else head_masks
    masks = make(model, x, 0.3, graph=g)
    assert masks, "something is offered"
    removed = 0
    for name, m in masks.items():  # filters all zero (HF Conv1D keeps its filters in columns)
        w = m["weight"].T if is_transposed_linear(model.get_submodule(name)) else m["weight"]
        removed += int((w.flatten(1).sum(1) == 0).sum())
    assert removed > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, res = shrink(model, masks, x, graph=g, return_result=True)
    assert not [str(w.message) for w in caught if issubclass(w.category, ShrinkWarning)]
    assert not res.fixed and not res.protected
    with as_pruned(model, masks, x, graph=g) as ref:
        want = _out(ref, x)
    torch.testing.assert_close(_out(small, x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    dense = count_flops_params(small, x, verbose=False)[:2]
    eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)[:2]
    assert dense == eff
    full = count_flops_params(model, x, verbose=False)[:2]
    assert dense[0] < full[0] and dense[1] < full[1]
