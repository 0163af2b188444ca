"""Both nodes against what ComfyUI changed after 0.3.64: conds computed in threads (multi-GPU), the ``latent_shapes``
keyword of ``OUTER_SAMPLE``, q/k/v in ``AttentionTensorContainer``s, grouped-query attention (``enable_gqa``) and
another node's override in the attention slot. A test whose ComfyUI lacks the feature skips and names it."""

import inspect
import threading

import comfy_harness as h
import pytest
import torch

STEPS = 6


@pytest.fixture(scope="module")
def hooks(comfy):
    h.load_pack()
    from comfyui_reuse.nodes import attention_hooks

    return attention_hooks


@pytest.fixture(scope="module")
def node(comfy):
    return h.pack_node("AttentionMapReuse")


def patched(node, model, **overrides):
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


def needs(comfy_attr: str, why: str):
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, comfy_attr):
        pytest.skip(f"{why}: not in ComfyUI {h.running_version()}")
    return getattr(attention, comfy_attr)


class SplitCondsIntoThreads:
    """Test-only CALC_COND_BATCH wrapper: computes each cond in its own thread, the way
    ``_calc_cond_batch_multigpu`` does on several devices; a barrier inside the model makes both forwards run
    at the same time (``threaded=False``: the same split, one after the other)."""

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self.barrier = threading.Barrier(2, timeout=30)

    def inside_model(self, executor, *args, **kwargs):
        if self.threaded:
            self.barrier.wait()
        return executor(*args, **kwargs)

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        results = [None] * len(conds)

        def one(i):
            only = [c if j == i else None for j, c in enumerate(conds)]
            results[i] = executor(model, only, x_in, timestep, model_options, *args, **kwargs)[i]

        if self.threaded:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(conds))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i in range(len(conds)):
                one(i)
        return results


def _split_into_threads(model, threaded: bool):
    import comfy.patcher_extension

    split = SplitCondsIntoThreads(threaded)
    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_split", split)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_split", split.inside_model)
    return model


def test_two_threads_in_the_model_at_once_keep_their_own_layers_and_steps(node, comfy, runs):
    model = h.sharpen_attention(h.tiny_model("sd15", seed=3))
    reuse = patched(node, model, strategy="hurry", reuse_steps=3, mode="map")
    outputs = {}
    for threaded in (False, True):
        outputs[threaded] = h.sample(_split_into_threads(reuse, threaded), steps=STEPS)
        assert runs.last().calls_reused > 0
    assert torch.equal(outputs[True], outputs[False]), "threads computing conds at once changed the result"


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_encoder_propagation_with_conds_in_two_threads(comfy, parallel):
    encoder = h.pack_node("EncoderFeaturePropagation")
    model = h.tiny_model("sd15", seed=3)
    inputs = h.node_inputs(encoder, key_steps="uniform", uniform_k=3, parallel_decoding=parallel)
    propagated = encoder.execute(model=model, **inputs).result[0]
    outputs = {threaded: h.sample(_split_into_threads(propagated, threaded), steps=STEPS) for threaded in (False, True)}
    assert torch.allclose(outputs[True], outputs[False], atol=1e-5)
    assert not torch.equal(outputs[True], h.sample(model, steps=STEPS))


def test_outer_sample_passes_latent_shapes_through(node, comfy):
    import comfy.patcher_extension
    import comfy.samplers

    if "latent_shapes" not in inspect.signature(comfy.samplers.CFGGuider.outer_sample).parameters:
        pytest.skip(f"OUTER_SAMPLE has no latent_shapes keyword in ComfyUI {h.running_version()}")
    encoder = h.pack_node("EncoderFeaturePropagation")
    model = h.tiny_model("sd15", seed=3)
    both = encoder.execute(model=patched(node, model, reuse_steps=2), **h.node_inputs(encoder)).result[0].clone()
    seen = []

    def innermost(executor, *args, **kwargs):  # added last: runs inside both nodes' OUTER_SAMPLE wrappers
        seen.append(kwargs.get("latent_shapes"))
        return executor(*args, **kwargs)

    both.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test_spy", innermost)
    assert torch.isfinite(h.sample(both, steps=STEPS)).all()
    assert seen and seen[0] is not None, "latent_shapes did not reach the inner OUTER_SAMPLE executor"


def _engine_context(hooks, run, step):
    return {
        "optimized_attention_override": hooks.make_attention_override(),
        hooks.FORWARD_KEY: hooks.ForwardContext(run, step, ("chunk",)),
    }


def _run(hooks, mode="map"):
    from comfyui_reuse.reuse_core.attention_engine import AttentionReuseConfig, AttentionReuseRun
    from comfyui_reuse.reuse_core.schedules import ReuseSchedule

    return AttentionReuseRun(AttentionReuseConfig(mode=mode), ReuseSchedule((1, 0)))


def _qkv(seed, b=2, n=12, heads=4, kv_heads=4, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=gen)
    k = torch.randn(b, n, kv_heads * d, generator=gen)
    v = torch.randn(b, n, kv_heads * d, generator=gen)
    return q, k, v


def test_tensor_containers_reach_the_engine_as_tensors(hooks):
    container = needs("AttentionTensorContainer", "q/k/v in AttentionTensorContainers")
    import comfy.ldm.modules.attention as attention

    run = _run(hooks)
    stored_qkv = _qkv(0)
    reuse_qkv = _qkv(1)
    for step, (q, k, v) in enumerate((stored_qkv, reuse_qkv)):
        boxed = [container(t.clone()) for t in (q, k, v)]
        out = attention.attention_basic(*boxed, 4, transformer_options=_engine_context(hooks, run, step))
        assert all(b.tensor is None for b in boxed), "the containers were not consumed"
    assert run.stats.stored == 1 and run.stats.reused == 1
    expected = attention.attention_basic(stored_qkv[0], stored_qkv[1], reuse_qkv[2], 4)  # P(step 0) @ V(step 1)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["map", "output"])
def test_grouped_query_attention_keeps_query_heads(hooks, mode):
    needs("_reshape_qkv_to_heads", "enable_gqa")
    import comfy.ldm.modules.attention as attention

    run = _run(hooks, mode)
    stored_qkv = _qkv(0, kv_heads=2)
    reuse_qkv = _qkv(1, kv_heads=2)
    outs = []
    for step, (q, k, v) in enumerate((stored_qkv, reuse_qkv)):
        options = _engine_context(hooks, run, step)
        outs.append(attention.attention_pytorch(q, k, v, 4, enable_gqa=True, transformer_options=options))
    assert run.stats.stored == 1 and run.stats.reused == 1 and run.stats.fallbacks == 0
    fused_store = attention.attention_pytorch(*stored_qkv, 4, enable_gqa=True)
    assert torch.allclose(outs[0], fused_store, atol=1e-5)
    expected = (
        fused_store
        if mode == "output"
        else attention.attention_pytorch(stored_qkv[0], stored_qkv[1], reuse_qkv[2], 4, enable_gqa=True)
    )
    assert outs[1].shape == fused_store.shape and torch.allclose(outs[1], expected, atol=1e-5)


class CountingOverride:
    """Another node's override in the slot (ComfyUI's ModelAttentionBackend, a tagged core override, ...)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        return self.inner(func, *args, **kwargs)


def _with_attention_backend(model):
    import comfy_extras.nodes_model_advanced as advanced

    if not hasattr(advanced, "ModelAttentionBackend"):
        pytest.skip(f"ModelAttentionBackend is not in ComfyUI {h.running_version()}")
    patched_model = advanced.ModelAttentionBackend().patch(model, "pytorch attention")[0]
    options = patched_model.model_options["transformer_options"]
    spy = options["optimized_attention_override"] = CountingOverride(options["optimized_attention_override"])
    return patched_model, spy


@pytest.mark.parametrize("order", ["backend_first", "reuse_first"])
def test_attention_backend_override_is_chained_in_either_order(node, comfy, runs, order):
    model = h.sharpen_attention(h.tiny_model("sd15", seed=4))
    if order == "backend_first":
        backend, spy = _with_attention_backend(model)
        both = patched(node, backend, strategy="hurry", reuse_steps=3)
        off = patched(node, backend, strategy="hurry", reuse_steps=0)
    else:
        both, spy = _with_attention_backend(patched(node, model, strategy="hurry", reuse_steps=3))
        off, _ = _with_attention_backend(patched(node, model, strategy="hurry", reuse_steps=0))
    reference, _ = _with_attention_backend(model)
    out = h.sample(both, steps=STEPS)
    assert spy.calls > 0, "the other node's override was dropped"
    assert runs.last().calls_reused > 0, "the other node's override dropped ours"
    assert not torch.equal(out, h.sample(reference, steps=STEPS))
    assert torch.equal(h.sample(off, steps=STEPS), h.sample(reference, steps=STEPS))


def test_attention_kwargs_of_newer_releases_reach_the_backend(hooks):
    """Releases after 0.33 pass ``preferred_attention`` (and may add more): every call hands them on untouched."""
    import comfy.ldm.modules.attention as attention

    run = _run(hooks)
    seen = []

    def backend(q, k, v, heads, **kwargs):
        seen.append(kwargs.get("preferred_attention"))
        return attention.attention_basic(q, k, v, heads)

    for step, (q, k, v) in enumerate((_qkv(0), _qkv(1))):
        options = _engine_context(hooks, run, step)
        options["optimized_attention_override"](
            backend, q, k, v, 4, transformer_options=options, preferred_attention="sage"
        )
    assert seen == ["sage"], "the store step must call the backend with the caller's kwargs; the reuse step none"
    assert run.stats.stored == 1 and run.stats.reused == 1
