"""Encoder Feature Propagation in real ComfyUI: tiny SD1.5- and SDXL-shaped U-Nets through comfy.sample.sample."""

import functools
import importlib

import pytest
import torch
from comfy_harness import load_pack, node_inputs, sample, tiny_model

STEPS = 6


@pytest.fixture(scope="module")
def efp(comfy):
    load_pack()
    return importlib.import_module("comfyui_reuse.nodes.encoder_hooks")


@pytest.fixture(scope="module")
def core(comfy):
    load_pack()
    return {
        name: importlib.import_module(f"comfyui_reuse.reuse_core.{name}")
        for name in ("encoder_engine", "key_steps", "noise_injection")
    }


@pytest.fixture(scope="module")
def models(comfy):
    return {"sd15": tiny_model("sd15", seed=0), "sdxl": tiny_model("sdxl", seed=0)}


def patch(efp, core, model, preset="paper", k=4, parallel=True, max_batch=4, **config):
    spec = core["key_steps"].KeyStepSpec(preset, k)
    cfg = core["encoder_engine"].EncoderPropagationConfig(
        key_steps=spec, parallel_decoding=parallel, max_decoders_per_batch=max_batch, **config
    )
    return efp.apply_encoder_propagation(model, cfg)


def rel_diff(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@functools.cache
def _baseline(models_key, kind, sampler, cfg, batch, steps):
    return sample(_MODELS[models_key][kind], steps=steps, cfg=cfg, sampler=sampler, batch=batch, kind=kind)


_MODELS = {}


@pytest.fixture(scope="module")
def baseline(models):
    _MODELS["m"] = models
    _baseline.cache_clear()
    yield lambda kind, sampler="euler", cfg=5.0, batch=2, steps=STEPS: _baseline("m", kind, sampler, cfg, batch, steps)
    _baseline.cache_clear()
    _MODELS.clear()  # no model outlives the module (ComfyUI's ModelPatcher.__del__ fails at interpreter exit)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_every_step_a_key_step_is_bit_identical(efp, core, models, baseline, kind, sampler, cfg):
    patched = patch(efp, core, models[kind], "uniform", k=1)
    out = sample(patched, steps=STEPS, cfg=cfg, sampler=sampler, batch=2, kind=kind)
    assert torch.equal(out, baseline(kind, sampler, cfg))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "heun"])
def test_parallel_and_sequential_decoding_agree(efp, core, models, baseline, kind, sampler):
    outs = [
        sample(
            patch(efp, core, models[kind], "one_pass", parallel=parallel, max_batch=8),
            steps=STEPS,
            sampler=sampler,
            batch=2,
            kind=kind,
        )
        for parallel in (True, False)
    ]
    assert rel_diff(outs[0], outs[1]) < 1e-4
    assert torch.isfinite(outs[0]).all()
    assert not torch.equal(outs[0], baseline(kind, sampler))  # reuse really happened


@pytest.mark.parametrize(("kind", "cfg"), [("sd15", 1.0), ("sdxl", 1.0), ("sd15", 5.0)])
def test_paper_preset_stays_close_to_the_full_model(efp, core, models, baseline, kind, cfg):
    par = sample(patch(efp, core, models[kind], "paper"), steps=10, cfg=cfg, batch=2, kind=kind)
    seq = sample(patch(efp, core, models[kind], "paper", parallel=False), steps=10, cfg=cfg, batch=2, kind=kind)
    base = baseline(kind, "euler", cfg, 2, 10)
    assert rel_diff(par, seq) < 1e-4
    assert 0 < rel_diff(par, base) < 0.2


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde", "uni_pc"])
def test_multi_evaluation_samplers(efp, core, models, baseline, sampler):
    model = models["sd15"]
    full = sample(patch(efp, core, model, "uniform", k=1), steps=STEPS, sampler=sampler, batch=2)
    assert torch.equal(full, baseline("sd15", sampler))
    par = sample(patch(efp, core, model, "uniform", k=2), steps=STEPS, sampler=sampler, batch=2)
    seq = sample(patch(efp, core, model, "uniform", k=2, parallel=False), steps=STEPS, sampler=sampler, batch=2)
    assert torch.isfinite(par).all()
    assert rel_diff(par, seq) < 1e-4
    assert 0 < rel_diff(par, full) < 0.5


def test_stats_report_key_steps_and_saved_encoder_passes(efp, core, models, runs):
    sample(patch(efp, core, models["sd15"], "uniform", k=2, max_batch=4), steps=STEPS, batch=2)
    stats = runs.one()
    # cond and uncond run as one batch per step: 6 calls, the encoder skipped at steps 1, 3, 5.
    assert stats.key_steps == (0, 2, 4), stats
    assert (stats.encoder_passes_saved, stats.model_calls) == (3, 6), stats
    assert stats.decoder_batches == 3, stats


def test_one_pass_batches_all_decoders_and_window_forces_full_steps(efp, core, models, runs):
    sample(patch(efp, core, models["sd15"], "one_pass", max_batch=8), steps=STEPS, batch=2)
    stats = runs.one()
    assert stats.key_steps == (0,) and (stats.encoder_passes_saved, stats.model_calls) == (5, 6), stats
    batches = (stats.decoder_batches, stats.decoded_steps, stats.largest_batch, stats.served_from_parallel)
    assert batches == (1, 5, 5, 4), stats  # one batch of the 5 decoder-only steps, 4 of them served from it
    runs.clear()
    sample(patch(efp, core, models["sd15"], "one_pass", end_percent=0.5), steps=STEPS, batch=2)
    keys = runs.one().key_steps
    assert keys[0] == 0 and len(keys) > 1 and keys[-1] == STEPS - 1  # late steps outside the window run in full


def test_input_model_is_never_modified_and_no_state_leaks(efp, core, models):
    model = models["sd15"]
    wrappers_before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()}
    options_before = repr(model.model_options)
    before = sample(model, steps=STEPS, batch=2)
    patched = patch(efp, core, model, "uniform", k=2)
    first = sample(patched, steps=STEPS, batch=2)
    second = sample(patched, steps=STEPS, batch=2)
    assert torch.equal(first, second)  # a second run starts from a clean cache
    assert efp.RUN_STATE_KEY not in patched.model_options.get("transformer_options", {})
    assert {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()} == wrappers_before
    assert repr(model.model_options) == options_before
    assert torch.equal(sample(model, steps=STEPS, batch=2), before)
    # Re-applying replaces the settings instead of stacking a second set of wrappers.
    twice = patch(efp, core, patch(efp, core, model, "one_pass"), "uniform", k=2)
    assert torch.equal(sample(twice, steps=STEPS, batch=2), first)


def test_img2img_denoise(efp, core, models, comfy):
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    base = sample(models["sdxl"], steps=STEPS, denoise=0.6, latent=latent, kind="sdxl")
    full = sample(
        patch(efp, core, models["sdxl"], "uniform", k=1), steps=STEPS, denoise=0.6, latent=latent, kind="sdxl"
    )
    reused = sample(patch(efp, core, models["sdxl"], "paper"), steps=STEPS, denoise=0.6, latent=latent, kind="sdxl")
    assert torch.equal(full, base)
    assert torch.isfinite(reused).all() and rel_diff(reused, base) < 0.2


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_decoder_path_matches_the_native_forward(efp, core, models, comfy, kind):
    """Decoding freshly captured features at the same timestep reproduces ComfyUI's forward exactly, with
    another pack's output-block patch (FreeU, which edits tensors in place) and ControlNet residuals."""
    from comfy_extras.nodes_freelunch import FreeU

    unet_decoder = importlib.import_module("comfyui_reuse.nodes.unet_decoder")
    patcher = FreeU().patch(models[kind], 1.3, 1.4, 0.9, 0.2)[0]
    net = patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ts = torch.tensor([700.0, 700.0])
    context = torch.randn(2, 7, 64, generator=gen)
    y = torch.randn(2, 2816, generator=gen) if kind == "sdxl" else None
    options = {
        "patches": {k: list(v) for k, v in patcher.model_options["transformer_options"]["patches"].items()},
        "cond_or_uncond": [1, 0],
        "uuids": ["u", "c"],
    }

    def run(control):
        host = unet_decoder.ComfyUNetHost(lambda *a, **kw: net._forward(*a, **kw), net, control, options, {})
        return host.full_forward(x, ts, context, capture=True, y=y)

    with torch.no_grad():
        plain, features = run(None)
        assert len(features.skips) == len(net.input_blocks)
        shapes = [s.shape for s in features.skips]

        def residuals(seed):
            g = torch.Generator().manual_seed(seed)
            return {
                "input": [torch.randn(s, generator=g) * 0.1 for s in reversed(shapes)],
                "middle": [torch.randn(features.middle.shape, generator=g) * 0.1],
                "output": [torch.randn(s, generator=g) * 0.1 for s in shapes],
            }

        controlled, control_features = run(residuals(1))
        assert not torch.equal(plain, controlled)
        for feats, expected, control_seed in ((features, plain, None), (control_features, controlled, 1)):
            # Twice: FreeU and ControlNet edit tensors in place, which must never reach the cached features.
            for _ in range(2):
                control = None if control_seed is None else {"output": residuals(control_seed)["output"]}
                host = unet_decoder.ComfyUNetHost(None, net, control, options, {})
                assert torch.equal(host.decode(feats, ts, context, y=y), expected)
        # A parallel batch of 3 copies decodes each block like the single call.
        batched = unet_decoder.ComfyUNetHost(None, net, None, options, {}).decode(
            features.tile(3), ts.repeat(3), context.repeat(3, 1, 1), y=None if y is None else y.repeat(3, 1)
        )
        torch.testing.assert_close(batched[4:6], plain, rtol=1e-4, atol=1e-5)


def test_freeu_chain_every_step_key_is_bit_identical(efp, core, models):
    from comfy_extras.nodes_freelunch import FreeU

    freeu = FreeU().patch(models["sd15"], 1.3, 1.4, 0.9, 0.2)[0]
    base = sample(freeu, steps=STEPS, batch=2)
    assert torch.equal(sample(patch(efp, core, freeu, "uniform", k=1), steps=STEPS, batch=2), base)
    par = sample(patch(efp, core, freeu, "one_pass", max_batch=8), steps=STEPS, batch=2)
    seq = sample(patch(efp, core, freeu, "one_pass", parallel=False), steps=STEPS, batch=2)
    assert rel_diff(par, seq) < 1e-4


class TestPriorNoiseInjection:
    def injecting(self, core, alpha, tau=500.0):
        return core["noise_injection"].PriorNoiseInjection(alpha, tau)

    def test_refused_for_samplers_where_it_is_not_exact(self, efp, core, models):
        patched = patch(efp, core, models["sd15"], injection=self.injecting(core, 0.003))
        for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):
            with pytest.raises(ValueError, match=r"noise_alpha.*euler and ddim"):
                sample(patched, steps=STEPS, sampler=sampler)

    @pytest.mark.parametrize("kind", ["sd15", "sdxl"])
    def test_applied_exactly_for_euler_and_ddim(self, efp, core, models, comfy, kind):
        import comfy.samplers

        noise_injection = core["noise_injection"]
        model = models[kind]
        injection = self.injecting(core, 0.003)
        ms = model.get_model_object("model_sampling")
        with_injection = sample(patch(efp, core, model, "uniform", k=1, injection=injection), steps=STEPS, kind=kind)
        without = sample(model, steps=STEPS, kind=kind)
        assert not torch.equal(with_injection, without)

        # Reference: the unpatched model sampled with the injecting Euler sampler through SamplerCustom's path.
        def reference(alpha):
            function = functools.partial(
                noise_injection.sample_euler_prior_noise,
                injection=self.injecting(core, alpha),
                timestep_of=lambda s: float(ms.timestep(s.reshape(1)).item()),
            )
            sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
            return sample_custom(model, comfy.samplers.KSAMPLER(function), sigmas, kind)

        assert torch.equal(reference(0.003), with_injection)
        assert torch.equal(reference(0.0), without)  # the loop is ComfyUI's euler operation for operation
        # tau = 0: no step has t < 0, so the output is the plain one.
        off = sample(
            patch(efp, core, model, "uniform", k=1, injection=self.injecting(core, 0.003, 0.0)), steps=STEPS, kind=kind
        )
        assert torch.equal(off, without)
        ddim = sample(patch(efp, core, model, "paper", injection=injection), steps=STEPS, sampler="ddim", kind=kind)
        assert torch.isfinite(ddim).all()


def sample_custom(model, sampler, sigmas, kind):
    import comfy.sample
    from comfy_harness import conditioning

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative = conditioning(kind)
    return comfy.sample.sample_custom(
        model, noise, 5.0, sampler, sigmas, positive, negative, latent, seed=0, disable_pbar=True
    )


def node_class():
    return importlib.import_module("comfyui_reuse.nodes.encoder_node").EncoderFeaturePropagation


class TestNode:
    def test_schema(self, efp):
        schema = node_class().define_schema()
        assert schema.node_id == "EncoderFeaturePropagation"
        assert schema.display_name == "Encoder Feature Propagation"
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
        assert {i.id for i in schema.inputs} >= {
            "model",
            "key_steps",
            "uniform_k",
            "custom_key_steps",
            "parallel_decoding",
            "max_decoders_per_batch",
            "noise_alpha",
            "noise_tau",
            "start_percent",
            "end_percent",
        }

    def test_registered_by_the_pack_entry_point(self, efp):
        from comfy_harness import pack_node

        assert pack_node("EncoderFeaturePropagation") is node_class()

    def execute(self, efp, model, **overrides):
        node = node_class()
        return node.execute(model, **node_inputs(node, **overrides)).result[0]

    def test_execute_clones(self, efp, models):
        """Bad inputs refused at execution, naming the field: tests/test_compat_inputs.py (ENCODER_BAD)."""
        model = models["sd15"]
        patched = self.execute(efp, model, key_steps="custom", custom_key_steps="0, 2, 4")
        assert patched is not model and patched.model is model.model
        assert torch.isfinite(sample(patched, steps=STEPS)).all()

    def test_unsupported_model_family_is_named(self, efp, models):
        other = models["sd15"].clone()
        other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
        with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear"):
            self.execute(efp, other)
