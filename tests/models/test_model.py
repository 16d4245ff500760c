"""SSiT model: reference parity, token selection, shapes, gradients, EMA precision, errors."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from conftest import SHARED
from ssit_dist.data.salient_patches import salient_token_indices
from ssit_dist.dist import full_fp32_parameters
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import SSiT
from ssit_dist.models.vit import create_encoder, encode
from ssit_dist.train.pretrain_step import PlainEngine, train_step
from ssit_dist.train.schedule import momentum as momentum_at
from tiny_model import batch, tiny

FIXTURE = SHARED / "fixtures" / "ssit_reference_tiny.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"reference test vectors not found at {FIXTURE} (../shared is absent here)")
    return torch.load(FIXTURE, weights_only=True)


def _reference_model(ref: dict) -> SSiT:
    c = ref["config"]
    return SSiT.from_reference(
        ref["state_dict"],
        arch="vit_small_patch16_224",
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        proj_hidden=c["mlp_dim"],
        proj_dim=c["dim"],
        temperature=c["T"],
        mask_ratio=c["mask_ratio"],
        pool=c["pool_mode"],
        saliency_threshold=c["saliency_threshold"],
    )


def test_losses_gradients_and_momentum_match_the_reference(reference: dict) -> None:
    # Through the step the trainer runs (train_step), with an optimizer that leaves the weights as
    # they are (lr 0) and no clipping, so the gradients can be read as the reference computed them.
    model = _reference_model(reference).train()
    engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.0), clip_grad=None)
    batch = (reference["x1"], reference["x2"], reference["m1"], reference["m2"])
    losses = train_step(engine, model.momentum, [batch], reference["m"], 1.0, reference["config"]["ss_weight"])
    assert losses.contrastive.item() == pytest.approx(reference["cl_loss"], rel=1e-5)
    assert losses.saliency.item() == pytest.approx(reference["ss_loss"], rel=1e-5)

    renames = [
        (r"^base_encoder\.head\.", "online.projector."),
        (r"^base_encoder\.", "online.encoder."),
        (r"^predictor\.", "online.predictor."),
        (r"^saliency_segmentor\.0\.", "online.saliency_head.proj."),
    ]
    params = dict(model.named_parameters())
    checked = 0
    for key, expected in reference["grads"].items():
        name = next(re.sub(p, r, key) for p, r in renames if re.match(p, key))
        got = params[name].grad
        assert got is not None, name
        assert (got - expected).norm() <= 1e-4 * expected.norm() + 1e-12, name
        checked += 1
    assert checked == len(params) - len(list(model.momentum.parameters()))

    ours = model.momentum.state_dict()
    for key, expected in reference["momentum_after"].items():
        name = "projector." + key[5:] if key.startswith("head.") else "encoder." + key
        torch.testing.assert_close(ours[name].float(), expected.float(), atol=1e-6, rtol=0, msg=name)


def test_from_reference_accepts_the_ddp_prefix_and_rejects_strangers(reference: dict) -> None:
    prefixed = {f"module.{k}": v for k, v in reference["state_dict"].items()}
    reference = {**reference, "state_dict": prefixed}
    model = _reference_model(reference)
    torch.testing.assert_close(model.online.encoder.cls_token, prefixed["module.base_encoder.cls_token"])
    with pytest.raises(ValueError, match="unexpected key 'decoder.weight'"):
        SSiT.from_reference(
            {**prefixed, "decoder.weight": torch.zeros(1)},
            img_size=32,
            patch_size=8,
            embed_dim=48,
            depth=2,
            num_heads=3,
            proj_hidden=64,
            proj_dim=32,
        )


def test_salient_tokens_are_the_top_patches_of_a_hand_built_map() -> None:
    # 4x4 patches of 2x2 pixels; patch (row r, col c) gets value 16 - (4r + c) except where overridden.
    saliency = torch.zeros(1, 1, 8, 8)
    values = {0: 0.1, 5: 0.9, 6: 0.8, 10: 0.95, 15: 0.7, 3: 0.6}
    for patch, v in values.items():
        r, c = divmod(patch, 4)
        saliency[0, 0, 2 * r + 1, 2 * c] = v  # one bright pixel: max pooling finds it, avg dilutes it
    keep = salient_token_indices(saliency, patch=2, mask_ratio=0.75)  # keep 4 of 16
    assert keep.tolist() == [[0, 11, 6, 7, 16]]  # CLS, then patches 10, 5, 6, 15 shifted by one
    all_kept = salient_token_indices(saliency, patch=2, mask_ratio=0.0)
    assert all_kept.shape == (1, 17) and sorted(all_kept[0].tolist()) == list(range(17))
    # Ties (the ten empty patches) are broken by the lower index, deterministically.
    keep_ties = salient_token_indices(saliency, patch=2, mask_ratio=0.5)
    assert keep_ties[0, 1:].tolist() == [11, 6, 7, 16, 4, 1, 2, 3]
    avg = salient_token_indices(
        saliency * 0 + torch.arange(64.0).view(1, 1, 8, 8), patch=2, mask_ratio=0.75, pool="avg"
    )
    assert avg[0, 1:].tolist() == [16, 15, 14, 13]


def test_key_encoder_sees_only_the_selected_tokens() -> None:
    vit = create_encoder("vit_small_patch16_224", 32, patch_size=8, embed_dim=48, depth=1, num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = salient_token_indices(torch.rand(2, 1, 32, 32), 8, 0.25)
    tokens = encode(vit, x, keep)
    assert tokens.shape == (2, 13, 48)
    # With every token kept in natural order, the salient forward equals timm's own forward.
    everything = torch.arange(17).expand(2, 17)
    torch.testing.assert_close(encode(vit, x, everything), vit.forward_features(x))


def test_output_shapes_and_gradients_reach_the_online_side_only() -> None:
    model = tiny().train()
    x1, x2, s1, s2 = batch()
    k = model.momentum(x1, s1)
    assert k.shape == (6, 32) and not k.requires_grad
    logits = model.online.saliency_head(encode(model.online.encoder, x1)[:, 1:])
    assert logits.shape == (6, 1, 32, 32)
    cl, ss = model.online(x1, x2, s1, s2, k, model.momentum(x2, s2))
    assert cl.shape == ss.shape == () and torch.isfinite(cl) and torch.isfinite(ss)
    (cl + ss).backward()
    for name, p in model.online.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name, p in model.momentum.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_momentum_update_follows_m() -> None:
    model = tiny()
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum.parameters()]
    sources = [p for m in model.online.ema_source() for p in m.parameters()]
    model.momentum.update(sources, 0.9)
    for old, new, src in zip(before, model.momentum.parameters(), sources, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * src)


def test_ema_in_fp32_tracks_float64_under_bf16_training() -> None:
    model = tiny(timm_kwargs=dict(patch_size=8, embed_dim=48, depth=1, num_heads=3))
    optimizer = torch.optim.AdamW(model.online.parameters(), lr=1e-3)
    x1, x2, s1, s2 = batch(4)
    sources = [p for m in model.online.ema_source() for p in m.parameters()]
    exact = [p.detach().double().clone() for p in model.momentum.parameters()]
    m = 0.999
    for step in range(1000):
        model.momentum.update(sources, m)
        for e, p in zip(exact, sources, strict=True):
            e.mul_(m).add_(p.detach().double(), alpha=1 - m)
        if step % 10 == 0:  # train every 10th step: the EMA must follow moving weights, cheaply
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cl, ss = model.online(x1, x2, s1, s2, model.momentum(x1, s1), model.momentum(x2, s2))
            optimizer.zero_grad()
            (cl + ss).backward()
            optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.momentum.parameters())
    drift = max((p.double() - e).abs().max().item() for p, e in zip(model.momentum.parameters(), exact, strict=True))
    moved = max((p.double() - e).abs().max().item() for p, e in zip(sources, exact, strict=True))
    assert drift < 1e-6 and moved > 1e-4, (drift, moved)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    model = tiny().train()
    engine = PlainEngine(model.online, torch.optim.AdamW(model.online.parameters(), lr=3e-3))
    pairs = batch(8, seed=3)
    losses = []
    for _ in range(12):
        step = train_step(engine, model.momentum, [pairs], 0.99, 1.0, 10.0)
        losses.append((step.contrastive + 10 * step.saliency).item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_momentum_schedule_is_a_cosine_ramp() -> None:
    assert momentum_at(0.0, 100) == pytest.approx(0.99)
    assert momentum_at(50, 100) == pytest.approx(0.995)
    assert momentum_at(100, 100) == pytest.approx(1.0)
    assert momentum_at(25, 100) < momentum_at(50, 100) < momentum_at(75, 100)


def test_full_fp32_parameters_of_plain_modules() -> None:
    layer = torch.nn.Linear(3, 2)
    pairs = zip(full_fp32_parameters(layer), layer.parameters(), strict=True)
    assert all(a is b or torch.equal(a, b) for a, b in pairs)
    half = torch.nn.Linear(3, 2).to(torch.bfloat16)
    full = full_fp32_parameters(half)
    assert all(t.dtype == torch.float32 for t in full)
    torch.testing.assert_close(full[0], half.weight.float())


def test_clear_errors() -> None:
    model = tiny().train()
    x1, x2, s1, s2 = batch()
    k = torch.zeros(6, 32)
    with pytest.raises(ValueError, match=r"saliency map shape \(6, 1, 16, 16\) does not match images"):
        model.online(x1, x2, s1[..., :16, :16], s2, k, k)
    with pytest.raises(ValueError, match="batch size 1 per rank"):
        model.online(x1[:1], x2[:1], s1[:1], s2[:1], k[:1], k[:1])
    with pytest.raises(ValueError, match="img_size 30 is not divisible by the patch size 8"):
        create_encoder("vit_small_patch16_224", 30, patch_size=8)
    with pytest.raises(ValueError, match=r"mask_ratio = 1.0: must be in \[0, 1\)"):
        tiny(mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown ViT architecture 'vit_gigantic_patch3'"):
        create_encoder("vit_gigantic_patch3")


def test_moco_v3_switch_drops_token_selection_and_saliency_head() -> None:
    """saliency=false is plain MoCo v3 with everything else shared: same encoder, projector and predictor
    (same init), no saliency head, a zero saliency loss, and keys from every patch, so the saliency maps
    no longer change them."""
    ssit, moco = tiny(), tiny(saliency=False)
    assert moco.online.saliency_head is None
    assert not any(name.startswith("saliency_head") for name, _ in moco.online.named_parameters())
    shared = {k: v for k, v in ssit.online.state_dict().items() if not k.startswith("saliency_head")}
    assert shared.keys() == moco.online.state_dict().keys()
    assert all(torch.equal(v, moco.online.state_dict()[k]) for k, v in shared.items())

    x1, x2, s1, s2 = batch()
    moco.eval(), ssit.eval()
    k_moco = moco.momentum(x1, s1)
    assert torch.equal(k_moco, moco.momentum(x1, torch.rand_like(s1)))  # saliency maps play no part
    assert not torch.equal(ssit.momentum(x1, s1), ssit.momentum(x1, torch.rand_like(s1)))
    everything = moco.momentum.projector(encode(moco.momentum.encoder, x1)[:, 0])
    assert torch.equal(k_moco, everything)

    k2 = moco.momentum(x2, s2)
    c_moco, s_moco = moco.online(x1, x2, s1, s2, k_moco, k2)
    c_ssit, s_ssit = ssit.online(x1, x2, s1, s2, k_moco, k2)
    assert torch.equal(c_moco, c_ssit)
    assert s_moco.item() == 0.0 and s_ssit.item() > 0


def test_moco_v3_trains_through_the_same_step() -> None:
    """The trainer's step runs in MoCo v3 mode: every online parameter gets a gradient and moves."""
    model = tiny(saliency=False).train()
    params = list(model.online.parameters())
    engine = PlainEngine(model.online, torch.optim.AdamW(params, lr=1e-2))
    before = [p.detach().clone() for p in params]
    losses = train_step(engine, model.momentum, [batch()], 0.99, 1.0, 10.0, None)
    assert losses.saliency.item() == 0.0 and losses.contrastive.item() > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_both_views_in_one_pass_give_each_views_own_keys_and_features() -> None:
    # One encoder pass over the two views must be the per-view computation: the transformer works per
    # image, and the projector's BatchNorm still normalises each view over its own batch. The matmuls
    # of a 2B-row pass may sum in another order than a B-row pass (fp32 rounding, ~1e-7 relative per
    # sum of 48 terms), so equality is checked to 1e-5, far above rounding and far below any mix-up
    # of views or batch statistics (those change keys by O(1)).
    model = tiny().train()
    x1, x2, s1, s2 = batch()
    k1, k2 = model.momentum.pair_keys(x1, s1, x2, s2)
    torch.testing.assert_close(k1, model.momentum(x1, s1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, model.momentum(x2, s2), atol=1e-5, rtol=1e-5)
    assert (k1 - k2).abs().max() > 0.1
    f = encode(model.online.encoder, torch.cat([x1, x2]))
    torch.testing.assert_close(f[6:], encode(model.online.encoder, x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_attention_kernels_compute_the_same_function(attention: str) -> None:
    # Fused and explicit attention differ in summation order only: agreement to 1e-5 (see above).
    assert ModelConfig(attention="auto").fused_attention("cuda") and not ModelConfig().fused_attention("cpu")
    assert ModelConfig(attention="fused").fused_attention("cpu") and not ModelConfig(
        attention="explicit"
    ).fused_attention("cuda")
    model, other = tiny(attention=attention).eval(), tiny().eval()
    model.use_fused_attention(attention == "fused")
    other.use_fused_attention(attention != "fused")
    assert [b.attn.fused_attn for b in model.momentum.encoder.blocks] == [attention == "fused"] * 2
    x1, x2, s1, s2 = batch()
    torch.testing.assert_close(model.momentum(x1, s1), other.momentum(x1, s1), atol=1e-5, rtol=1e-5)
    k1, k2 = model.momentum.pair_keys(x1, s1, x2, s2)
    torch.testing.assert_close(
        model.online(x1, x2, s1, s2, k1, k2), other.online(x1, x2, s1, s2, k1, k2), atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow  # inductor compiles C++ in worker processes
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo's own probing
@pytest.mark.parametrize("checkpointing", [False, True], ids=["blocks", "checkpointed"])
def test_compiled_model_trains_like_the_eager_one(checkpointing: bool) -> None:
    from torch._dynamo.utils import counters

    from ssit_dist.models.compile import compile_model

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny(grad_checkpointing=checkpointing).train(), tiny(grad_checkpointing=checkpointing).train()
    # Each call of a block counts itself as eager (slot 0) or compiled (slot 1): dynamo traces the hook
    # with is_compiling() True, so the graph adds to slot 1 at every run; an eager call adds to slot 0.
    # A tensor, not a list: dynamo would guard on a list's length and recompile at every call.
    online_calls, momentum_calls = torch.zeros(2), torch.zeros(2)

    def counter(calls: torch.Tensor) -> Callable[..., None]:
        def count(*_: object) -> None:  # returns None: a pre-hook's result would replace the block's input
            calls[int(torch.compiler.is_compiling())] += 1

        return count

    for calls, encoder in ((online_calls, compiled.online.encoder), (momentum_calls, compiled.momentum.encoder)):
        for block in encoder.blocks:
            block.register_forward_pre_hook(counter(calls))
    reason = compile_model(compiled.online.encoder, compiled.momentum, torch.device("cpu"), 0)
    if reason is not None and "C++ compiler" in reason:
        pytest.skip(reason)
    assert reason is None
    assert compile_model(eager.online.encoder, eager.momentum, torch.device("cpu"), 3) is not None  # ZeRO-3: why not
    losses = []
    momenta = (0.9, 0.93, 0.97)  # a new m every step, as the schedule ramps it
    for model in (eager, compiled):
        engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.1))
        steps = [train_step(engine, model.momentum, [batch(seed=s)], m, 1.0, 1.0) for s, m in enumerate(momenta)]
        losses.append([v for s in steps for v in (s.contrastive.item(), s.saliency.item())])
    # Really compiled, not fallen back to eager: dynamo captured graphs and none of its frames failed;
    # the momentum update once for all three m (one graph each for the two encoders' blocks and it).
    # With checkpointing the query blocks are called one by one: one graph serves both, and the hook of
    # a block called on its own is a frame of its own (inside the stack's graph it is inlined).
    frames = counters["frames"]
    graphs = 4 if checkpointing else 3
    assert counters["stats"]["unique_graphs"] == graphs and frames["ok"] == frames["total"], dict(counters)
    # Every block call of both encoders ran compiled: per step each query block once, and once more
    # when the backward recomputes it; each key block once (no gradients: never checkpointed).
    depth, steps = len(compiled.online.encoder.blocks), len(momenta)
    assert online_calls.tolist() == [0, depth * steps * (2 if checkpointing else 1)]
    assert momentum_calls.tolist() == [0, depth * steps]
    # Inductor fuses and reorders fp32 arithmetic (rounding ~1e-7 relative per op); after two steps at lr
    # 0.1 the losses still agree to 1e-4, while any change of function would move them by far more.
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-4)
    for a, b in zip(compiled.momentum.parameters(), eager.momentum.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # inductor compiles C++ in worker processes
def test_compiled_momentum_update_is_the_eager_one() -> None:
    # The compiled update fed the same online weights at changing m: fused into one pass per tensor,
    # inductor does the same fp32 operations in the same order (it does not reassociate), except that a
    # compiler may contract a multiply and an add into one rounding. That changes the compensation in
    # its last bit, which can move a parameter's rounding by one unit in the last place (at most 2^-23
    # of its magnitude) and no more; a wrong weight or a lost compensation moves them by ~1e-4.
    from torch._dynamo.utils import counters

    from ssit_dist.models.compile import why_not_compiled

    reason = why_not_compiled(torch.device("cpu"), zero_stage=0)
    if reason is not None:
        pytest.skip(reason)
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny().momentum, tiny().momentum
    compiled.compile_update()
    online = tiny().online.requires_grad_(False)
    source = [p + 0.01 * torch.randn_like(p) for p in online.encoder.parameters()] + [
        p.clone() for p in online.projector.parameters()
    ]
    for m in (0.99, 0.995, 0.999):
        eager.update(source, m)
        compiled.update(source, m)
    start = tiny().momentum.parameters()
    moved = max((a - b).abs().max().item() for a, b in zip(eager.parameters(), start, strict=True))
    assert moved > 1e-4
    frames = counters["frames"]  # one graph for the three m, really compiled
    assert counters["stats"]["unique_graphs"] == 1 and frames["ok"] == frames["total"], dict(counters)
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2**-23, atol=0)


def test_activation_checkpointing_gives_the_same_step_and_recomputes_the_blocks() -> None:
    # The same seed, batch and step with and without model.grad_checkpointing: the same losses and
    # gradients (the recomputation repeats the forward's arithmetic), and each query block runs twice.
    runs = {}
    for checkpointing in (False, True):
        model = tiny(grad_checkpointing=checkpointing).train()
        calls: list[int] = []
        model.online.encoder.blocks[0].register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.0))
        losses = train_step(engine, model.momentum, [batch()], 0.99, 1.0, 10.0, None)
        grads = [p.grad.clone() for p in model.online.encoder.parameters() if p.grad is not None]
        runs[checkpointing] = (losses.contrastive.item(), losses.saliency.item(), grads, len(calls))
    (c0, s0, g0, n0), (c1, s1, g1, n1) = runs[False], runs[True]
    assert (c0, s0) == (c1, s1) and len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # recomputation: the same ops, same inputs
    assert (n0, n1) == (1, 2)  # the query block once, and once more in the backward
