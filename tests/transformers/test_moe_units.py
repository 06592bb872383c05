"""Mixture-of-experts units (Mixtral, Qwen2-MoE; transformers 5 fused experts, ``grouped_mm``) against hand tables.

Configs: hidden 32, 4 heads, 2 kv heads, 4 experts, top-2 routing, expert width W = 16, 2 layers (Qwen2-MoE: a
shared expert of width 24). Per layer, derived from the modelling code (``gate_up_proj`` is ``(E, 2I, H)``,
rows ``[gate; up]``; ``down_proj`` is ``(E, H, W)``):

* fused layer ``experts.gate_up_proj``: ``E · 2I = 128`` output channels, channel ``e · 2I + r`` = row ``r`` of
  expert ``e``. Unit ``(e, j)`` = rows ``j`` and ``W + j`` of expert ``e`` (gate and up), read by column ``j`` of
  ``down_proj[e]`` (its input column ``e · W + j``). 64 units, no unit spans two experts.
* fused layer ``experts.down_proj``: ``E · H`` output channels; channel ``e · H + h`` is hidden channel ``h`` of
  the residual stream for every expert (tied to ``embed_tokens`` channel ``h``).
* the router ``mlp.gate``: 4 output channels (one per expert), each its own class, not tied to anything, and
  reported unsafe (``topk`` fixes their number).
* Qwen2-MoE's shared expert: unit ``j`` = ``gate_proj`` row ``j`` + ``up_proj`` row ``j``.

Both experts implementations that run on a single device are checked: ``grouped_mm`` (the default,
``torch._grouped_mm`` on expert-sorted tokens) and ``batched_mm`` (``bmm`` with one gathered expert weight per
token-expert pair); they must give the same table.

Physical proof: remove 25 % of every expert's units (4 of 16, different ones per expert, same count) and 25 % of
the shared expert's units, shrink, compare with the masked model (fp32, rtol 1e-4) and compare the MACs of the
shrunk model with the effective MACs of the masked one. Routing is discontinuous (top-k), but the router reads the
residual stream, which neither model changes, so both route every token to the same experts.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope import count_flops_params  # noqa: E402
from prunescope.errors import MaskError  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.narrow import shrink  # noqa: E402
from prunescope.removal.plan import plan_removal  # noqa: E402
from prunescope.topology import TopologyWarning, channel_atoms  # noqa: E402
from prunescope.topology.tracing import meta_trace  # noqa: E402

H, E, K, W, LAYERS = 32, 4, 2, 16, 2
SHARED = 24


def build(kind: str, attn: str, impl: str = "grouped_mm") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=K, max_position_embeddings=32,
                  attn_implementation=attn)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=W, num_local_experts=E, **common)
        model = transformers.MixtralModel(cfg)
    else:
        cfg = transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=W, num_experts=E,
                                          shared_expert_intermediate_size=SHARED, **common)
        model = transformers.Qwen2MoeModel(cfg)
    with torch.no_grad():  # experts are created empty: give them values
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.2)
    model.config._experts_implementation = impl  # the default is grouped_mm
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))}


def partition(ca, layer: str) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for c, k in enumerate(ca.layer_classes(layer).tolist()):
        groups.setdefault(k, []).append(c)
    return list(groups.values())


def engine(kind: str, attn: str, impl: str = "grouped_mm"):
    model = build(kind, attn, impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        g = trace(model, inputs())
        ca = channel_atoms(g)
    return model, g, ca


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_unit_table(kind: str, attn: str, impl: str) -> None:
    model, g, ca = engine(kind, attn, impl)
    for layer in range(LAYERS):
        p = f"layers.{layer}.mlp"
        gu, down, router = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj", f"{p}.gate"
        li = ca.layers[gu]
        assert (li.kind, li.experts, li.out_channels, li.in_channels) == ("experts", E, E * 2 * W, H)
        assert partition(ca, gu) == [[e * 2 * W + j, e * 2 * W + W + j] for e in range(E) for j in range(W)]
        # down_proj column j of expert e reads unit (e, j) and nothing else
        dli = ca.layers[down]
        assert (dli.kind, dli.experts, dli.out_channels, dli.in_channels) == ("experts", E, E * H, W)
        want = np.array([ca.atom_class(ca.atom(gu, e * 2 * W + j)) for e in range(E) for j in range(W)])
        assert np.array_equal(ca.atom_class(dli.inputs[0]), want)
        assert len(set(want.tolist())) == E * W  # 64 independent units
        # down_proj output channel h of every expert is hidden channel h of the residual stream
        for h in (0, 5, H - 1):
            cls = {ca.atom_class(ca.atom(down, e * H + h)) for e in range(E)}
            assert cls == {ca.atom_class(ca.atom("embed_tokens", h))}
        # the router's channels are experts: separate, tied to nothing, pinned by topk
        assert partition(ca, router) == [[0], [1], [2], [3]]
        assert all(len(ca.class_members(int(c))) == 1 for c in ca.layer_classes(router))
        assert any("'topk'" in r for r in ca.unsafe[router])
        assert gu not in ca.unsafe
        if kind == "qwen2_moe":
            s = f"{p}.shared_expert"
            assert partition(ca, f"{s}.gate_proj") == [[j] for j in range(SHARED)]
            for j in (0, 7, SHARED - 1):
                assert sorted(ca.class_members(ca.atom_class(ca.atom(f"{s}.gate_proj", j)))) == [
                    (f"{s}.gate_proj", j), (f"{s}.up_proj", j)]
            assert f"{s}.gate_proj" not in ca.unsafe
    assert not ca.stopped_ops


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_eager_equals_sdpa_and_meta_trace(kind: str) -> None:
    _, _, a = engine(kind, "eager")
    _, _, b = engine(kind, "sdpa")
    for layer in a.layers:
        if a.layers[layer].kind == "experts":
            assert partition(a, layer) == partition(b, layer)
    g = meta_trace(build(kind, "sdpa"), inputs())  # _grouped_mm on meta: the output is made from the shapes
    assert g is not None
    assert sum(n.name == "_grouped_mm" for n in g.nodes) == 2 * LAYERS


def moe_masks(model: torch.nn.Module, kind: str, per_expert: list[int] | None = None) -> dict:
    """Remove ``per_expert[e]`` units (default 25 %) of expert e, different units per expert, and 25 % of the
    shared expert's units."""
    rng = np.random.default_rng(0)
    per_expert = per_expert or [W // 4] * E
    masks: dict = {}
    for layer in range(LAYERS):
        p = f"layers.{layer}.mlp"
        w = model.get_submodule(f"{p}.experts").gate_up_proj
        m = torch.ones_like(w)
        for e in range(E):
            for j in rng.permutation(W)[:per_expert[e]].tolist():
                m[e, j] = 0
                m[e, W + j] = 0
        masks[f"{p}.experts.gate_up_proj"] = {"weight": m}
        if kind == "qwen2_moe":
            drop = rng.permutation(SHARED)[:SHARED // 4].tolist()
            for proj in ("gate_proj", "up_proj"):
                mm = torch.ones(SHARED, H)
                mm[drop] = 0
                masks[f"{p}.shared_expert.{proj}"] = {"weight": mm}
    return masks


def masked_copy(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, entry in masks.items():
            key = name if name in params else f"{name}.weight"
            params[key].mul_(entry["weight"])
    return m


@pytest.mark.parametrize("impl,fix", [("grouped_mm", False), ("grouped_mm", True), ("batched_mm", True)])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_remove_quarter_of_every_expert_physically(kind: str, impl: str, fix: bool) -> None:
    model = build(kind, "sdpa", impl)
    x = inputs()
    masks = moe_masks(model, kind)
    small, res = shrink(model, masks, x, fix_conflicts=fix, return_result=True)
    assert not res.protected
    for layer in range(LAYERS):
        ex = small.get_submodule(f"layers.{layer}.mlp.experts")
        assert tuple(ex.gate_up_proj.shape) == (E, 2 * (W - W // 4), H)
        assert tuple(ex.down_proj.shape) == (E, H, W - W // 4)
        if kind == "qwen2_moe":
            sh = small.get_submodule(f"layers.{layer}.mlp.shared_expert")
            assert sh.gate_proj.weight.shape[0] == sh.down_proj.weight.shape[1] == SHARED - SHARED // 4
    with torch.no_grad():
        want = masked_copy(model, masks)(**x).last_hidden_state
        got = small(**x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    macs_small = count_flops_params(small, x, verbose=False)[0]
    macs_eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)[0]
    macs_dense = count_flops_params(model, x, verbose=False)[0]
    assert macs_small == macs_eff < macs_dense
    # by hand: every token-expert pair (T·k of them) does 3·H·W MACs in the experts; a quarter of W goes
    T = x["input_ids"].numel()
    saved = LAYERS * T * K * 3 * H * (W // 4)
    if kind == "qwen2_moe":
        saved += LAYERS * T * 3 * H * (SHARED // 4)
    assert macs_dense - macs_small == saved


def test_unequal_counts_per_expert_are_kept_with_a_reason() -> None:
    model = build("mixtral", "sdpa")
    x = inputs()
    masks = moe_masks(model, "mixtral", per_expert=[4, 4, 4, 2])
    plan = plan_removal(trace(model, x), masks)
    name = "layers.0.mlp.experts.gate_up_proj"
    assert not plan.removed[name].any()
    assert "unequal output channels per expert [24, 28]" in plan.protected[name][0]


def test_fused_masks_are_validated() -> None:
    model = build("mixtral", "sdpa")
    x = inputs()
    with pytest.raises(MaskError, match="fused expert parameter 'layers.0.mlp.experts.gate_up_proj'.*shape"):
        count_flops_params(model, x, masks={"layers.0.mlp.experts.gate_up_proj": {"weight": torch.ones(4, 32)}},
                           effective=True, verbose=False)
    with pytest.raises(MaskError, match="values other than 0 and 1"):
        w = torch.full((E, 2 * W, H), 0.5)
        count_flops_params(model, x, masks={"layers.0.mlp.experts.gate_up_proj": {"weight": w}},
                           effective=True, verbose=False)


class TinyMoE(torch.nn.Module):
    """A hand-written MoE layer on ``torch._grouped_mm`` (the shape of the HF code) with variations:
    ``'pin'`` writes the expert width as a literal (``view(-1, 16)``) between the two products, ``'leak'`` adds
    the output of a single expert product straight into the residual stream (no down projection)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed = torch.nn.Linear(8, H)
        self.router = torch.nn.Linear(H, E, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * W, H) * 0.2)
        self.down = torch.nn.Parameter(torch.randn(E, H, W) * 0.2)
        self.up = torch.nn.Parameter(torch.randn(E, H, H) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        w, idx = torch.topk(self.router(x).softmax(-1), K, dim=-1)
        ids_g, perm = torch.sort(idx.reshape(-1))
        xs = x[perm // K]
        offs = torch.cumsum(torch.histc(ids_g.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
        if self.mode == "leak":
            return xs + torch._grouped_mm(xs, self.up.transpose(-2, -1), offs=offs)
        gate, up = torch._grouped_mm(xs, self.gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        if self.mode == "pin":
            h = h.view(-1, W)
        y = torch._grouped_mm(h, self.down.transpose(-2, -1), offs=offs) * w.reshape(-1)[perm, None]
        return x + y.sum(0, keepdim=True)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_template_pins_hold_for_every_expert(device: str) -> None:
    model = TinyMoE("pin").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        ca = channel_atoms(trace(model, torch.ones(5, 8, device=device)))
    assert any("'view' writes the size 16" in r for r in ca.unsafe["gate_up"])
    for e in range(E):  # every expert's units are pinned, not only expert 0's (the template)
        for j in (0, W - 1):
            assert ca.class_notes.get(int(ca.atom_class(ca.atom("gate_up", e * 2 * W + j))))
    assert partition(ca, "gate_up") == [[e * 2 * W + j, e * 2 * W + W + j] for e in range(E) for j in range(W)]


def test_template_meeting_the_residual_ties_every_expert() -> None:
    model = TinyMoE("leak")
    ca = channel_atoms(trace(model, torch.ones(5, 8)))
    for h in (0, H - 1):  # one position of the single product's output = row h of every expert = residual h
        assert {int(ca.atom_class(ca.atom("up", e * H + h))) for e in range(E)} == {
            int(ca.atom_class(ca.atom("embed", h)))}


def test_expert_masks_prune_the_lowest_units_of_every_expert_and_shrink() -> None:
    from prunescope import unit_masks
    from prunescope.masks.expert_masks import expert_masks

    model = build("qwen2_moe", "sdpa")
    x = inputs()
    masks = expert_masks(model, x, 0.25)
    assert sorted(masks) == [f"layers.{i}.mlp.experts.gate_up_proj" for i in range(LAYERS)]
    for layer in range(LAYERS):  # by hand: unit (e, j) scores |gate row j|_1 + |up row j|_1 of expert e
        w = model.get_submodule(f"layers.{layer}.mlp.experts").gate_up_proj.detach()
        score = w[:, :W].abs().sum(-1) + w[:, W:].abs().sum(-1)  # (E, W)
        m = masks[f"layers.{layer}.mlp.experts.gate_up_proj"]["weight"]
        for e in range(E):
            gone = sorted(torch.argsort(score[e], stable=True)[:W // 4].tolist())
            assert sorted((m[e, :W, 0] == 0).nonzero().flatten().tolist()) == gone
            assert torch.equal(m[e, :W], m[e, W:])  # gate and up rows of a unit go together
    masks.update(unit_masks(model, x, 0.25, layers=[f"layers.{i}.mlp.shared_expert.gate_proj"
                                                    for i in range(LAYERS)]))
    small = shrink(model, masks, x)
    assert tuple(small.layers[0].mlp.experts.down_proj.shape) == (E, H, W - W // 4)
    with torch.no_grad():
        torch.testing.assert_close(small(**x).last_hidden_state, masked_copy(model, masks)(**x).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
    assert count_flops_params(small, x, verbose=False)[0] == count_flops_params(
        model, x, masks=masks, effective=True, verbose=False)[0]


def test_router_stays_unsafe_after_the_pin_probe() -> None:
    """Removing router row e runs (softmax and topk over 3 channels, every shape fits) but shifts the expert
    indices: the pin probe, which clears pins whose removal runs with every size following, must keep it."""
    from prunescope.removal import not_safe_to_prune

    unsafe = not_safe_to_prune(build("mixtral", "sdpa"), inputs(), with_reasons=True)
    assert isinstance(unsafe, dict)
    for layer in range(LAYERS):
        assert any("'topk'" in r for r in unsafe[f"layers.{layer}.mlp.gate"])


def test_apply_masks_and_as_pruned_take_fused_masks() -> None:
    from prunescope.masks import apply_masks
    from prunescope.narrow import as_pruned

    model = build("qwen2_moe", "sdpa")
    x = inputs()
    masks = moe_masks(model, "qwen2_moe")
    before = model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        want = masked_copy(model, masks)(**x).last_hidden_state
        with apply_masks(model, masks):
            torch.testing.assert_close(model(**x).last_hidden_state, want)
        with as_pruned(model, masks, x) as m:
            torch.testing.assert_close(m(**x).last_hidden_state, want)
    assert torch.equal(model.layers[0].mlp.experts.gate_up_proj, before)  # weights come back bit for bit


def test_a_conv1d_weight_name_is_not_taken_for_a_fused_parameter() -> None:
    from prunescope.masks.files import validate_masks

    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3))
    with pytest.raises(MaskError, match="no such layer"):
        validate_masks({"0.weight": {"weight": torch.ones(4, 2, 3)}}, net)
