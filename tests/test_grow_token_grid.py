"""scripts/grow_token_grid.py: a 4x4-token model grown into the feature-pyramid design
keeps its weights and (where the positions allow) its predictions exactly; bad requests
stop with one line and write nothing."""

import importlib.util

import pytest
import torch

from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL

spec = importlib.util.spec_from_file_location("grow_token_grid", PROJECT_ROOT / "scripts" / "grow_token_grid.py")
grow_token_grid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_token_grid)


def trained_looking(seed=0, **overrides):
    """A tiny 4x4-token model with non-trivial weights everywhere (random BatchNorm
    statistics and position embeddings), in eval mode."""
    torch.manual_seed(seed)
    model = HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, **overrides})).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.hybrid_vit.embeddings.position_embeddings.normal_(0, 0.5)
        model.hybrid_vit.embeddings.cls_token.normal_(0, 0.5)
    return model


def test_weights_are_copied_laterals_start_at_zero_and_positions_are_resized():
    old = trained_looking()
    new = grow_token_grid.grow(old, token_stages=2)
    assert old.config.num_patches == 16 and new.config.num_patches == 64 and new.config.patch_size == 2
    old_state, new_state = old.state_dict(), new.state_dict()
    added = sorted(set(new_state) - set(old_state))
    assert added == ["hybrid_vit.embeddings.lateral_tokens.0.bias", "hybrid_vit.embeddings.lateral_tokens.0.weight"]
    assert all(new_state[key].abs().max() == 0 for key in added)
    positions = "hybrid_vit.embeddings.position_embeddings"
    for key in old_state:
        if key != positions:
            torch.testing.assert_close(new_state[key], old_state[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(new_state[positions], old.hybrid_vit.embeddings.interpolate_pos_encoding(8, 8))
    assert new_state[positions].shape == (1, 65, TINY_MODEL["hidden_size"])


@pytest.mark.parametrize("class_attention_layers", [None, 1])
def test_fine_tokens_start_as_copies_and_predictions_barely_move(class_attention_layers):
    old = trained_looking(seed=1)
    new = grow_token_grid.grow(old, token_stages=2, class_attention_layers=class_attention_layers)
    pixels = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        coarse, fine = old.hybrid_vit.embeddings.features(pixels), new.hybrid_vit.embeddings.features(pixels)
        assert coarse.shape[-2:] == (4, 4) and fine.shape[-2:] == (8, 8)
        torch.testing.assert_close(fine, coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), rtol=0, atol=0)
        # With one position for every patch, attention over four copies of a token is attention
        # over the one, except that the CLS token's own share shrinks: logits move a little.
        with torch.no_grad():
            old.hybrid_vit.embeddings.position_embeddings[:, 1:] = old.hybrid_vit.embeddings.position_embeddings[:, 1:2]
        same_positions = grow_token_grid.grow(old, token_stages=2, class_attention_layers=class_attention_layers)
        before, after = old(pixel_values=pixels).logits, same_positions(pixel_values=pixels).logits
        assert (after - before).abs().max() < 2e-3 * before.abs().max()
        assert (after - before).abs().max() > 0


def test_blocks_can_become_class_attention_or_be_dropped():
    old = trained_looking()
    grown = grow_token_grid.grow(old, token_stages=2, class_attention_layers=1)
    assert grown.config.class_attention_layers == 1
    assert [layer.attention.class_attention for layer in grown.hybrid_vit.layers] == [False, True]
    shorter = grow_token_grid.grow(old, token_stages=2, num_hidden_layers=1)
    assert shorter.config.num_hidden_layers == 1 and len(shorter.hybrid_vit.layers) == 1
    torch.testing.assert_close(shorter.hybrid_vit.layers[0].attention.to_qkv.weight,
                               old.hybrid_vit.layers[0].attention.to_qkv.weight, rtol=0, atol=0)


def test_the_command_line_saves_a_loadable_folder_and_refuses_bad_requests(tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    source = tmp_path / "old"
    save_model_and_processor(trained_looking(), source)
    (source / "train_config.yaml").write_text("data:\n  train_val_split: 0.2\ntraining:\n  seed: 3\n")
    grow_token_grid.main(["--model", str(source), "--output_dir", str(tmp_path / "new")])
    assert "64 tokens (8x8)" in capsys.readouterr().out
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "new", trust_remote_code=True)
    assert loaded.config.token_stages == 2 and loaded.config.logit_temperature == 1.0
    assert (tmp_path / "new" / "train_config.yaml").read_text() == (source / "train_config.yaml").read_text()
    assert (tmp_path / "new" / "preprocessor_config.json").is_file()

    for argv, message in (
        (["--token_stages", "1", "--output_dir", str(tmp_path / "a")], "already has 2"),
        (["--token_stages", "3", "--output_dir", str(tmp_path / "b")], "token_stages"),
        (["--num_hidden_layers", "5", "--output_dir", str(tmp_path / "c")], "--num_hidden_layers 5"),
        (["--class_attention_layers", "3", "--output_dir", str(tmp_path / "d")], "class_attention_layers"),
    ):
        with pytest.raises(SystemExit) as stop:
            grow_token_grid.main(["--model", str(tmp_path / "new"), *argv])
        assert message in str(stop.value) and "\n" not in str(stop.value)
        assert not (tmp_path / argv[-1].split("/")[-1]).exists()
    with pytest.raises(SystemExit) as stop:  # a folder in use is never overwritten
        grow_token_grid.main(["--model", str(source), "--output_dir", str(tmp_path / "new")])
    assert "not empty" in str(stop.value)
