"""The GPU's numerics on the CPU: AMP=bf16 runs forward passes and losses under bf16 autocast, and no
optimizer step ever runs inside an autocast region (its cached bf16 weights would go stale)."""
import pytest
import torch
import torch.nn.functional as F

from nbmodule import load_notebook, notebook_parameters


def test_amp_resolves_per_device(nb):
    resolve = lambda env, cuda: nb.resolve_settings(notebook_parameters(), env, cuda_available=cuda).amp
    assert resolve({}, True) == "bf16" and resolve({}, False) == "off"
    assert resolve({"AMP": "bf16", "DEVICE": "cpu"}, False) == "bf16" and resolve({"AMP": "off"}, True) == "off"
    with pytest.raises(nb.SettingsError, match="AMP='fp8' is unknown"):
        resolve({"AMP": "fp8"}, False)


def first_conv_calls(model):
    conv = next(m for m in model.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    conv.register_forward_hook(lambda m, inp, out: calls.append(
        (inp[0].detach().clone(), out.detach().float(), m.weight.detach().clone(), m.bias.detach().clone())))
    return conv, calls


def test_generator_step_sees_the_updated_discriminator_under_bf16(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(AMP="bf16"), tiny_data)
    assert model.amp
    for group in model.optimizers["d"].param_groups:
        group["lr"] = 0.2   # large updates, so stale weights would be far from current ones
    conv, calls = first_conv_calls(model)
    model.train()
    model.start_epoch(0, 1)
    model.train_step(tiny_data.train_x[:16])
    assert len(calls) == 3   # D(real), D(fake) for D's step, D(fake) for G's step
    x, out, weight, bias = calls[2]
    old_weight, old_bias = calls[0][2], calls[0][3]
    assert not torch.equal(weight, old_weight)   # D was updated in between

    def conv_with(w, b):
        return F.conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), stride=conv.stride, padding=conv.padding).float()
    current, stale = conv_with(weight, bias), conv_with(old_weight, old_bias)
    scale = current.abs().max()
    assert (out - current).abs().max() / scale < 0.02            # bf16 rounding only
    assert (out - stale).abs().max() / scale > 0.1                # and clearly not the pre-update weights


def test_an_optimizer_step_inside_autocast_is_refused(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(), tiny_data)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="inside an autocast region"):
        model.train_step(tiny_data.train_x[:8])   # what the old engine did: one region around the whole step


def test_vq_quantiser_searches_in_fp32_under_autocast(nb):
    vq = nb.VectorQuantizerEMA(codes=64, dim=8).eval()
    z = torch.randn(4, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, _, _ = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert q.dtype == torch.float32
    assert torch.equal(idx.flatten(), torch.cdist(flat, vq.embedding).argmin(1))


@pytest.mark.parametrize("name", list(load_notebook().MODEL_REGISTRY))
def test_every_model_trains_under_bf16(nb, settings, tiny_data, name):
    S = settings(AMP="bf16", EPOCHS=1)
    run = nb.train_model(name, S, tiny_data)
    assert len(run.history) == 1 and not run.diverged and run.model.can("sample")
    assert run.model.sample(2).dtype == torch.uint8


def test_compiled_step_matches_eager(nb, settings, tiny_data):
    """COMPILE=on: torch.compile (inductor, on the CPU here) in place; the step equals the eager one."""
    eager = nb.build_model("conv_vae", settings(), tiny_data)
    compiled = nb.build_model("conv_vae", settings(COMPILE="on"), tiny_data)
    assert compiled.compiled == ["encoder", "decoder"] and list(compiled.state_dict()) == list(eager.state_dict())
    outs = []
    for model in (eager, compiled):
        model.train()
        torch.manual_seed(0)
        outs.append({k: float(v) for k, v in model.train_step(tiny_data.train_x[:16]).items()})
    for key in outs[0]:
        assert outs[1][key] == pytest.approx(outs[0][key], rel=1e-4), key
    # gradients, not Adam's sign-like first step; biases feeding batch norm have true gradient 0 (noise only)
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5 * scale)


def test_a_failing_compile_falls_back_to_eager_with_one_line(nb, settings, tiny_data, capsys):
    S = settings(COMPILE="on")
    model = nb.build_model("dcgan", S, tiny_data)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no compiler for this GPU")
    for name in model.compiled:
        getattr(model, name)._compiled_call_impl = broken
    history = nb.fit(model, tiny_data.train_x, S, "dcgan", 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("COMPILE:")]
    assert lines == ["COMPILE: torch.compile failed for dcgan (RuntimeError: inductor: no compiler for this GPU); "
                     "running it eagerly"]
    assert len(history) == 1 and model.compiled == []


def test_helper_stages_are_set_up_like_their_model_and_fall_back_with_it(nb, settings, tiny_data, monkeypatch):
    S = settings(COMPILE="on", AMP="bf16", EPOCHS=1)
    model = nb.build_model("vqvae", S, tiny_data)
    monkeypatch.setattr(nb, "fit", lambda helper, *args, **kwargs: [])  # set up, not trained (compiling is slow)
    stage, = model.stages
    nb.run_stage(stage, model, tiny_data, S, nb.training_stamp("vqvae", model.shaped_by, S, tiny_data.key))
    prior = model.prior
    assert (prior.name, prior.compiled, prior.amp) == ("vqvae_prior", ["embed", "blocks", "head"], torch.bfloat16)
    nb.plain_path(model)  # a compile failure inside the model's steps or sampling: the attached prior goes eager too
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


def test_fused_adam_steps_like_plain_adam(nb, settings, tiny_data):
    """The CUDA path's fused optimizers (PyTorch has a fused CPU Adam too, so the path runs here)."""
    plain, fused = (nb.build_model("dcgan", settings(), tiny_data) for _ in range(2))
    nb.fuse_optimizers(fused)
    for model in (plain, fused):
        model.train()
        torch.manual_seed(0)
        model.train_step(tiny_data.train_x[:16])
    compared = 0
    for a, b in zip(plain.parameters(), fused.parameters()):
        # a conv bias followed by batch norm has a gradient that is zero up to rounding (≈1e-10); Adam divides
        # that noise by its own size, so those steps are noise in both optimizers and are not compared
        if a.grad is not None and a.grad.abs().max() > 1e-6:
            assert torch.allclose(a, b, atol=1e-6)
            compared += 1
    assert compared >= 6
    nb.plain_path(fused)
    assert all(g["fused"] is None for opt in fused.optimizers.values() for g in opt.param_groups)


def read_every_tf32_setting():
    """Both of torch's APIs, as inductor, cuDNN's flags() and user code read them; reading a legacy flag raises
    once the new `fp32_precision` API has been written."""
    b = torch.backends
    return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
            getattr(b.cuda.matmul, "fp32_precision", None), getattr(getattr(b.cudnn, "conv", None), "fp32_precision", None))


def test_tf32_for_training_and_exact_math_for_metrics_keep_both_apis_readable(nb):
    saved = nb.set_tf32(True)
    try:
        on = read_every_tf32_setting()
        assert on[:3] == (True, True, "high")
        with nb.exact_math():
            off = read_every_tf32_setting()
            assert off[:3] == (False, False, "highest")
            with torch.backends.cudnn.flags(enabled=True):   # what other libraries may do inside
                read_every_tf32_setting()
        assert read_every_tf32_setting() == on
        if on[3] is not None:   # torch with the new API reads the same values through it
            assert on[3:] == ("tf32", "tf32") and off[3] == "ieee" and off[4] != "tf32"
    finally:
        nb.set_tf32(*saved)


def test_the_code_search_is_exact_in_float64(nb):
    quantiser = nb.VectorQuantizerEMA(codes=64, dim=8)
    flat = torch.randn(500, 8)
    exact = torch.cdist(flat.double(), quantiser.embedding.double()).argmin(1)
    assert torch.equal(quantiser.assign(flat), exact)


T4, P100, A100 = (("Tesla T4", (7, 5), False), ("Tesla P100-PCIE-16GB", (6, 0), False),
                  ("NVIDIA A100-SXM4-40GB", (8, 0), True))


@pytest.mark.parametrize("card, amp, compiled", [(T4, "fp16", "on"), (P100, "fp16", "off"), (A100, "bf16", "on")])
def test_precision_and_compilation_follow_what_the_gpu_can_do(nb, card, amp, compiled):
    S = nb.resolve_settings(notebook_parameters(), {"DEVICE": "cuda"}, cuda_available=True, gpu=nb.Accelerator(*card))
    assert (S.amp, S.compile) == (amp, compiled)
    assert S.acceleration.startswith(f"{card[0]}, compute capability {card[1][0]}.{card[1][1]}: AMP {amp} (")
    assert ("no native bfloat16: fp16 autocast with gradient scaling" in S.acceleration) == (amp == "fp16")
    assert ("Triton needs 7.0 or newer" in S.acceleration) == (compiled == "off")


def test_an_explicit_choice_the_gpu_cannot_do_is_one_line(nb):
    with pytest.raises(nb.SettingsError) as err:
        nb.resolve_settings(notebook_parameters(), {"DEVICE": "cuda", "AMP": "bf16", "COMPILE": "on"},
                            cuda_available=True, gpu=nb.Accelerator(*P100))
    assert str(err.value).splitlines() == [
        "AMP=bf16: Tesla P100-PCIE-16GB has no native bfloat16: use AMP=fp16 (gradient scaling) or AMP=auto",
        "COMPILE=on: Tesla P100-PCIE-16GB (compute capability 6.0) is too old for Triton, which torch.compile needs "
        "(7.0 or newer): use COMPILE=off or COMPILE=auto"]


@pytest.mark.parametrize("name", ["dcgan", "conv_vae", "wgan_gp"])
def test_fp16_with_gradient_scaling_trains_like_fp32(nb, settings, tiny_data, name):
    """The T4/P100 path on the CPU: the same weights, batches and noise trained 6 steps in fp32, bf16 and fp16 autocast
    (one gradient scaler per optimizer). Stated tolerance: fp16 ends no farther from fp32, relative to how far fp32
    moved the weights, than the bf16 path does (measured: dcgan 0.14 vs 0.22, conv_vae 0.08 vs 0.14, wgan_gp 0.23
    vs 0.24); a scaler that skipped steps (a 2^16 start) ends 0.5–1.0 away."""
    start = nb.build_model(name, settings(), tiny_data)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    ends = []
    for amp in ("off", "fp16", "bf16"):
        model = nb.build_model(name, settings(AMP=amp), tiny_data)
        assert (model.amp is torch.float16) == (amp == "fp16") and bool(model.scalers) == (amp == "fp16")
        assert (model.amp is torch.bfloat16) == (amp == "bf16")
        torch.manual_seed(0)
        model.train()
        model.start_epoch(0, 1)
        for step in range(6):
            model.train_step(tiny_data.train_x[8 * step:8 * step + 8])
        ends.append(model.state_dict())
    keys = [k for k, v in initial.items() if v.dtype.is_floating_point and "running" not in k]
    moved = sum((ends[0][k].float() - initial[k].float()).norm() ** 2 for k in keys) ** 0.5
    apart = [float(sum((end[k].float() - ends[0][k].float()).norm() ** 2 for k in keys) ** 0.5 / moved)
             for end in ends[1:]]
    assert moved > 0 and apart[0] <= 1.1 * apart[1], apart
