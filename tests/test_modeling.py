"""The model meets the transformers contract: shapes, attentions, losses, saving and
loading with trust_remote_code, the pipeline, config validation, gradient checkpointing."""

import ast
import json

import pytest
import torch
from PIL import Image

from configuration_hybrid_vit import CIFAR10_LABELS, HybridViTConfig
from modeling_hybrid_vit import (
    HybridViTForImageClassification,
    HybridViTModel,
    save_model_and_processor,
)
from tests.conftest import TINY_MODEL, run_isolated


def pixels(batch=2, size=16, channels=3, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shapes(tiny_config):
    base = HybridViTModel(tiny_config).eval()
    out = base(pixels())
    tokens = tiny_config.num_patches + 1  # (16 / 4) ** 2 + CLS
    assert out.last_hidden_state.shape == (2, tokens, tiny_config.hidden_size)
    assert out.pooler_output.shape == (2, tiny_config.hidden_size)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])

    classifier = HybridViTForImageClassification(tiny_config).eval()
    assert classifier(pixels()).logits.shape == (2, 10)


def test_default_labels_are_cifar10():
    config = HybridViTConfig()
    assert config.num_labels == 10
    assert [config.id2label[i] for i in range(10)] == CIFAR10_LABELS
    assert config.label2id["truck"] == 9
    custom = HybridViTConfig(id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    assert custom.num_labels == 2


@pytest.mark.parametrize("attn_implementation", [None, "eager", "sdpa"])
def test_attentions_are_returned_with_rows_summing_to_one(attn_implementation):
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, **kwargs)).eval()
    out = model(pixels(), output_attentions=True, output_hidden_states=True)
    config = model.config
    assert len(out.attentions) == config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, config.num_attention_heads, config.num_patches + 1, config.num_patches + 1)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    plain = model(pixels())
    assert plain.attentions is None and plain.hidden_states is None
    torch.testing.assert_close(plain.logits, out.logits, atol=1e-5, rtol=1e-5)


def test_attention_probabilities_stay_float32_under_bf16_autocast():
    """The explicit path keeps scores and softmax in float32 under autocast, as the fused
    kernels do, so attention maps drawn from a bf16 run are exact probabilities."""
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, attn_implementation="eager")).eval()
    with torch.no_grad():
        reference = model(pixels(), output_attentions=True).attentions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixels(), output_attentions=True)
    assert out.logits.dtype == torch.bfloat16  # the rest of the model did run in bf16
    for attention, exact in zip(out.attentions, reference):
        assert attention.dtype == torch.float32
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-6, rtol=0)
        torch.testing.assert_close(attention, exact, atol=2e-2, rtol=0)


def test_eager_and_sdpa_give_the_same_logits():
    torch.manual_seed(0)
    eager = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, attn_implementation="eager")).eval()
    sdpa = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager(pixels()).logits, sdpa(pixels()).logits, atol=1e-5, rtol=1e-5)


def test_integer_and_soft_label_losses_leave_problem_type_alone(tiny_model):
    x = pixels(batch=4)
    hard = torch.tensor([0, 3, 9, 1])
    out = tiny_model(x, labels=hard)
    expected = torch.nn.functional.cross_entropy(out.logits, hard)
    torch.testing.assert_close(out.loss, expected)

    soft = torch.full((4, 10), 0.05)
    soft[torch.arange(4), hard] = 0.55
    soft_out = tiny_model(x, labels=soft)
    expected_soft = -(soft * out.logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(soft_out.loss, expected_soft)
    # One-hot soft labels give exactly the integer-label loss.
    one_hot = torch.nn.functional.one_hot(hard, 10).float()
    torch.testing.assert_close(tiny_model(x, labels=one_hot).loss, expected)
    assert tiny_model.config.problem_type is None
    with pytest.raises(ValueError, match="Soft labels must have shape"):
        tiny_model(x, labels=torch.rand(4, 3))


def test_other_image_sizes_interpolate_or_raise(tiny_model):
    with pytest.raises(ValueError, match="Expected 16x16 images, got 24x24"):
        tiny_model(pixels(size=24))
    out = tiny_model(pixels(size=24), interpolate_pos_encoding=True, output_attentions=True)
    assert out.logits.shape == (2, 10)
    assert out.attentions[0].shape[-1] == (24 // 4) ** 2 + 1
    # At the native size interpolation is the identity.
    torch.testing.assert_close(tiny_model(pixels(), interpolate_pos_encoding=True).logits, tiny_model(pixels()).logits)


def test_pyramid_tokens_are_the_finer_stage_plus_the_coarser_token_above_it(tmp_path):
    """token_stages 2: an 8x8 grid on a 16-pixel image of a two-stage backbone (patch 2),
    each token the first stage's features through its 1x1 convolution plus the second
    stage's token over its 2x2 cell; saved and loaded with the same logits."""
    torch.manual_seed(0)
    config = HybridViTConfig(**{**TINY_MODEL, "token_stages": 2})
    assert (config.patch_size, config.num_patches, config.backbone_downsampling) == (2, 64, 4)
    model = HybridViTForImageClassification(config).eval()
    embeddings = model.hybrid_vit.embeddings
    x = pixels()
    with torch.no_grad():
        outputs = model(x, output_attentions=True, output_hidden_states=True)
        whitened = embeddings.whitening(x)
        first = embeddings.backbone[: embeddings.lateral_ends[0]](whitened)
        coarse = embeddings.to_tokens(embeddings.backbone[embeddings.lateral_ends[0] :](first))  # (B, C, 4, 4)
        expected = embeddings.lateral_tokens[0](first) + coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        tokens = expected.flatten(2).transpose(1, 2) + embeddings.position_embeddings[:, 1:]
    assert first.shape[-2:] == (8, 8) and coarse.shape[-2:] == (4, 4)
    torch.testing.assert_close(outputs.hidden_states[0][:, 1:], tokens)
    assert all(attention.shape[-1] == 65 for attention in outputs.attentions)
    # The one-stage model's weights are all there, plus the lateral convolution's.
    one_stage = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL)).state_dict()
    extra = set(model.state_dict()) - set(one_stage)
    assert extra == {"hybrid_vit.embeddings.lateral_tokens.0.weight", "hybrid_vit.embeddings.lateral_tokens.0.bias"}
    with pytest.raises(ValueError, match="multiple of the backbone's downsampling 4"):
        model(pixels(size=18), interpolate_pos_encoding=True)
    assert model(pixels(size=24), interpolate_pos_encoding=True, output_attentions=True).attentions[0].shape[-1] == 12 * 12 + 1
    save_model_and_processor(model, tmp_path)
    loaded = HybridViTForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.token_stages == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, outputs.logits)


def test_wrong_inputs_say_what_was_expected(tiny_model):
    with pytest.raises(ValueError, match="Expected 3 channels, got 1"):
        tiny_model(pixels(channels=1))
    with pytest.raises(ValueError, match="floating-point"):
        tiny_model((pixels() * 255).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        tiny_model(torch.randn(3, 16, 16))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(image_size=30, backbone_hidden_sizes=[8, 16], patch_size=4), "image_size"),
        (dict(backbone_hidden_sizes=[8, 16, 32], patch_size=4), "backbone_hidden_sizes"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(attention_probs_dropout_prob=-0.1), "attention_probs_dropout_prob"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(image_size=0), "image_size"),
        (dict(num_channels=0), "num_channels"),
        (dict(backbone_hidden_sizes=[8, 0]), "backbone_hidden_sizes"),
        (dict(backbone_hidden_sizes=[]), "backbone_hidden_sizes"),
        (dict(backbone_layers_per_stage=0), "backbone_layers_per_stage"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(initializer_range=-1.0), "initializer_range"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
        (dict(backbone_pool_first="yes"), "backbone_pool_first"),
        (dict(backbone_whitening_size=-1), "backbone_whitening_size"),
        (dict(backbone_whitening_size=1.5), "backbone_whitening_size"),
        (dict(class_attention_layers=3), "class_attention_layers"),
        (dict(class_attention_layers=-1), "class_attention_layers"),
        (dict(class_attention_layers=1, pooling="mean"), "class_attention_layers"),
        (dict(token_stages=0), "token_stages"),
        (dict(token_stages=3), "token_stages"),
        (dict(token_stages=True), "token_stages"),
        (dict(token_stages=2, patch_size=8), "patch_size"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        HybridViTConfig(**{**TINY_MODEL, **overrides})


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_last_class_attention_block_gives_the_self_attention_blocks_logits(attn_implementation):
    # The CLS token's output of a self-attention block depends only on its own attention
    # row and MLP, so with the same weights a last block that attends from the CLS token
    # alone gives the same logits; an earlier one changes the patch tokens the next reads.
    torch.manual_seed(0)
    config = HybridViTConfig(**TINY_MODEL, attn_implementation=attn_implementation)
    full = HybridViTForImageClassification(config).eval()
    last = HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, "class_attention_layers": 1}, attn_implementation=attn_implementation)).eval()
    both = HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, "class_attention_layers": 2}, attn_implementation=attn_implementation)).eval()
    last.load_state_dict(full.state_dict())
    both.load_state_dict(full.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference, outputs = full(x).logits, last(x, output_attentions=True)
        torch.testing.assert_close(last(x).logits, reference)
        torch.testing.assert_close(outputs.logits, reference)
        assert (both(x).logits - reference).abs().max() > 1e-4
        attentions = full(x, output_attentions=True).attentions
    # The class-attention block returns the self-attention block's CLS row, and an identity
    # row for each patch token, which it passes on unchanged.
    torch.testing.assert_close(outputs.attentions[1][:, :, 0], attentions[1][:, :, 0])
    tokens = outputs.attentions[1].shape[-1]
    torch.testing.assert_close(outputs.attentions[1][:, :, 1:], torch.eye(tokens)[1:].expand(3, 2, -1, -1))
    with torch.no_grad():
        hidden = both.hybrid_vit(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[2][:, 1:], hidden[0][:, 1:], rtol=0, atol=0)


def test_class_attention_gradients_reach_the_cls_row_only():
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, "class_attention_layers": 1})).eval()
    outputs = model(torch.randn(2, 3, 16, 16), output_attentions=True)
    gradient = torch.autograd.grad(outputs.logits[:, 0].sum(), outputs.attentions[1])[0]
    assert gradient[:, :, 0].abs().sum() > 0
    assert gradient[:, :, 1:].abs().sum() == 0


def test_backbone_layers_per_stage_deepens_the_stem():
    one = HybridViTModel(HybridViTConfig(**TINY_MODEL, backbone_layers_per_stage=1))
    two = HybridViTModel(HybridViTConfig(**TINY_MODEL, backbone_layers_per_stage=2))
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.embeddings.backbone)  # noqa: E731
    assert (convs(one), convs(two)) == (2, 4)
    assert two(pixels()).last_hidden_state.shape == one(pixels()).last_hidden_state.shape


def test_pool_first_runs_a_stages_later_convolutions_at_the_reduced_resolution():
    sizes = {}
    for pool_first in (False, True):
        model = HybridViTModel(HybridViTConfig(**TINY_MODEL, backbone_layers_per_stage=2, backbone_pool_first=pool_first))
        seen = []
        for module in model.embeddings.backbone:
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
        output = model(pixels())
        sizes[pool_first] = seen
    # TINY_MODEL: 16x16 images, two stages of two convolutions each, downsampling by 4 in all.
    assert sizes == {False: [16, 16, 8, 8], True: [16, 8, 8, 4]}
    assert output.last_hidden_state.shape == (2, 17, TINY_MODEL["hidden_size"])


def test_whitening_layer_whitens_training_patches_stays_frozen_and_is_saved(tmp_path):
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, backbone_whitening_size=2))
    # Correlated, off-centre "images": channel 1 follows channel 0, neighbouring pixels are alike.
    base = torch.randn(64, 1, 17, 17)
    smooth = base[..., 1:, 1:] + base[..., :-1, :-1]
    images = torch.cat([smooth, 0.9 * smooth + 0.1 * torch.randn_like(smooth), torch.randn_like(smooth) + 3], 1)
    model.fit_whitening(images)
    whitening = model.hybrid_vit.embeddings.whitening
    assert whitening.out_channels == 2 * 3 * 2 * 2 and "hybrid_vit.embeddings.whitening.weight" not in dict(model.named_parameters())
    assert torch.allclose(whitening.weight[:12], -whitening.weight[12:])
    # On every whole 2x2 patch (the layer's own padding comes from the forward pass, not the
    # conv), the first 12 filters give centred, uncorrelated, unit-variance outputs; the eps
    # regularisation shrinks tiny eigenvalues a little.
    conv = torch.nn.functional.conv2d(images, whitening.weight, whitening.bias)  # no padding, no activation
    out = conv[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert out.mean(0).abs().max() < 1e-4
    covariance = torch.cov(out.T)
    assert torch.allclose(covariance, torch.diag(covariance.diagonal()), atol=1e-4)
    assert covariance.diagonal().min() > 0.9 and covariance.diagonal().max() < 1.0 + 1e-4

    labels = torch.tensor([0, 1] * 32)
    model.train()(images[:, :, :16, :16], labels=labels).loss.backward()
    assert whitening.bias.grad is not None and not whitening.weight.requires_grad

    model.save_pretrained(tmp_path)
    loaded = HybridViTForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(loaded.hybrid_vit.embeddings.whitening.weight, whitening.weight)
    assert not loaded.hybrid_vit.embeddings.whitening.weight.requires_grad
    # Before fitting, the layer passes the pixels through: each patch's values, then their negatives.
    fresh = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, backbone_whitening_size=2))
    raw = torch.nn.functional.conv2d(images, fresh.hybrid_vit.embeddings.whitening.weight)
    assert torch.equal(raw[:, 0], images[:, 0, :-1, :-1]) and torch.equal(raw[:, 12], -images[:, 0, :-1, :-1])

    with pytest.raises(ValueError, match="no whitening layer"):
        HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, backbone_whitening_size=0)).fit_whitening(images)


def test_drop_path_rises_linearly_and_is_off_in_eval(tiny_config):
    config = HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 3, "drop_path_rate": 0.2})
    model = HybridViTForImageClassification(config)
    assert [layer.drop_path_rate for layer in model.hybrid_vit.layers] == pytest.approx([0.0, 0.1, 0.2])
    model.eval()
    torch.testing.assert_close(model(pixels()).logits, model(pixels()).logits)
    model.train()
    torch.manual_seed(0)
    first = model(pixels()).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(pixels()).logits)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = HybridViTForImageClassification(tiny_config).train()
    x, y = pixels(batch=4), torch.tensor([0, 1, 2, 3])

    def grads():
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path draws in both runs
        model(x, labels=y).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = grads()
    model.load_state_dict(state)  # BatchNorm running stats moved; put them back
    # transformers >= 5.2x renames gradient_checkpointing_enable; older 5.x has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert any(layer.gradient_checkpointing for layer in model.hybrid_vit.layers)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_saved_folder_is_a_complete_hub_repository(tiny_model, tmp_path):
    save_model_and_processor(tiny_model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_hybrid_vit.py",
        "modeling_hybrid_vit.py",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_hybrid_vit.HybridViTConfig"
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_hybrid_vit.HybridViTForImageClassification"
    )
    assert config["model_type"] == "hybrid_vit"
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("ViTImageProcessor")
    assert processor["size"] == {"height": 16, "width": 16}
    # The two shipped files import nothing but torch, transformers and the standard library
    # (and each other: the absolute fallback import is for running from the checkout).
    allowed = {"torch", "transformers", "math", "os", "configuration_hybrid_vit"}
    for name in ("configuration_hybrid_vit.py", "modeling_hybrid_vit.py"):
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed, f"{name} imports {module}"


def test_fresh_process_loads_identical_logits_and_runs_the_pipeline(tiny_model, tmp_path):
    folder = tmp_path / "model"
    save_model_and_processor(tiny_model, folder)
    x = pixels()
    torch.save(x, tmp_path / "x.pt")
    expected = tiny_model(x).logits
    work = tmp_path / "elsewhere"
    work.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(work / "red.png")
    result = run_isolated(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            logits = model(x).logits
        torch.save(logits, "logits.pt")
        processor = AutoImageProcessor.from_pretrained({str(folder)!r})
        assert type(processor).__name__.startswith("ViTImageProcessor"), type(processor)
        classify = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        predictions = classify(Image.open("red.png"), top_k=3)
        attentions = model(x, output_attentions=True).attentions
        eager = AutoModelForImageClassification.from_pretrained(
            {str(folder)!r}, trust_remote_code=True, attn_implementation="eager"
        ).eval()
        assert eager.config._attn_implementation == "eager"
        torch.testing.assert_close(eager(x).logits, logits, atol=1e-5, rtol=1e-5)
        print(json.dumps({{"predictions": predictions, "layers": len(attentions)}}))
        """,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(work / "logits.pt"), expected, atol=0, rtol=0)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["predictions"]) == 3
    assert {p["label"] for p in report["predictions"]} <= set(CIFAR10_LABELS)
    # Softmax, not sigmoid: the three best of ten probabilities sum to at most 1.
    assert sum(p["score"] for p in report["predictions"]) <= 1.0 + 1e-6
    assert report["layers"] == TINY_MODEL["num_hidden_layers"]


def test_the_default_config_is_the_design_that_works():
    """HybridViTConfig() is the project's design: a 48-96-192 backbone whose last two stages make
    64 pyramid tokens (patch 4), read by one class-attention block 192 wide; 1.02 M parameters."""
    config = HybridViTConfig()
    assert (config.backbone_hidden_sizes, config.token_stages, config.patch_size, config.num_patches) == ([48, 96, 192], 2, 4, 64)
    assert (config.num_hidden_layers, config.class_attention_layers, config.hidden_size, config.pooling) == (1, 1, 192, "cls")
    model = HybridViTForImageClassification(config).eval()
    assert model.num_parameters() == 1_022_242
    out = model(pixels(size=32), output_attentions=True)
    assert out.logits.shape == (2, 10) and out.attentions[0].shape == (2, 3, 65, 65)
