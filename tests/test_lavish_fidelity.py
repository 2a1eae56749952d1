"""LAVISH as the official code runs it (GenjiB/LAVISH, AVE): spectrogram orientation, the unresized
spectrogram through the ViT with its position embedding resampled, CLS pooling, the head's
(audio, video) order, the gated latent compression and the paper's training section.

The references are independent of the code under test: timm's own ``resample_abs_pos_embed``, a
per-position linear interpolation written out, the fbank as KaldiFbank returns it.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

import fusionkit
from fusionkit.describe import MetaMode
from fusionkit.engine.config import train_config
from fusionkit.experts.timm_vit import TimmViT
from fusionkit.frontends.spectrogram_image import SpectrogramImage
from fusionkit.recipes import load_recipe

LAVISH = ["lavish_vitb16", "lavish_swinv2_l"]
FBANK = dict(num_mel_bins=128, frame_shift=10.0, target_length=102, mean=-4.1426, std=3.2001)


def waveform(batch: int = 2, seconds: float = 1.0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, int(16000 * seconds), generator=torch.Generator().manual_seed(0))


def frontend_of(recipe: str) -> SpectrogramImage:
    spec = dict(load_recipe(recipe)["experts"]["audio"]["frontend"])
    assert spec.pop("type") == "spectrogram_image"
    return SpectrogramImage(**spec)


# orientation --------------------------------------------------------------------------------------

def test_time_rows_is_the_fbank_as_it_comes_and_mel_rows_stays_the_default():
    mel, time = SpectrogramImage(**FBANK), SpectrogramImage(orientation="time_rows", **FBANK)
    assert mel.orientation == "mel_rows"
    w = waveform()
    a, b = mel(w), time(w)
    assert a.shape == (2, 3, 1, 128, 102) and b.shape == (2, 3, 1, 102, 128)
    assert torch.equal(b[:, 0, 0], time.fbank(w))           # rows = frames, columns = mel bins
    assert torch.equal(b, a.transpose(-1, -2))
    with pytest.raises(ValueError, match="unknown orientation 'mel_columns'; valid: mel_rows, time_rows"):
        SpectrogramImage(orientation="mel_columns")


@pytest.mark.parametrize("recipe, image", [("lavish_vitb16", (102, 128)), ("lavish_swinv2_l", (192, 192))])
def test_lavish_recipes_feed_the_official_spectrogram(recipe: str, image: tuple[int, int]):
    """AVE/dataloader.py: the (target_length, num_mel_bins) fbank, not resized (ViT: 102 x 128)."""
    frontend = frontend_of(recipe)
    assert frontend.orientation == "time_rows" and frontend.size is None
    out = frontend(waveform())
    assert out.shape[-2:] == image
    assert torch.equal(out[:, 0, 0], frontend.fbank(waveform()))


@pytest.mark.parametrize("recipe", ["avstfp_vitb16", "avstfp_vitl14", "binding/lavish", "binding/avstfp"])
def test_other_recipes_keep_mel_rows(recipe: str):
    assert frontend_of(recipe).orientation == "mel_rows"


# position embedding for non-square inputs -------------------------------------------------------

def tiny_vit(pos_resample: str | None) -> TimmViT:
    """A 1-layer ViT, 32² input in 8² patches (a 4 x 4 grid + CLS), width 16."""
    torch.manual_seed(0)
    return TimmViT("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                   pos_resample=pos_resample)


def added_positions(vit: TimmViT, height: int, width: int):
    """The position embedding the expert adds to an input of ``height x width`` (patch projection and
    CLS token zeroed, so the tokens are the positions alone)."""
    with torch.no_grad():
        vit.vit.patch_embed.proj.weight.zero_()
        vit.vit.patch_embed.proj.bias.zero_()
        vit.vit.cls_token.zero_()
        return vit.embed(torch.zeros(1, 3, height, width))


def linear_along_sequence(pos: torch.Tensor, length: int) -> torch.Tensor:
    """``(1, N, D)`` -> ``(1, length, D)``: position ``i`` read at ``(i + ½)·N / length - ½`` (clamped),
    linearly between its two neighbours (half-pixel centres, as ``F.interpolate(mode="linear")``)."""
    n, rows = pos.shape[1], []
    for i in range(length):
        x = min(max((i + 0.5) * n / length - 0.5, 0.0), n - 1.0)
        lo = int(x)
        hi, frac = min(lo + 1, n - 1), x - lo
        rows.append((1 - frac) * pos[0, lo] + frac * pos[0, hi])
    return torch.stack(rows)[None]


@pytest.mark.parametrize("height, width, grid", [(24, 48, (3, 6)), (26, 50, (3, 6)), (48, 16, (6, 2))])
def test_bicubic_equals_timms_own_resample(height: int, width: int, grid: tuple[int, int]):
    vit = tiny_vit("bicubic")
    pos = vit.vit.pos_embed.detach().clone()
    tokens = added_positions(vit, height, width)
    assert (tokens.layout.t, tokens.layout.h, tokens.layout.w) == (1, *grid)
    expected = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[4, 4], num_prefix_tokens=1)
    assert tokens.x.shape == (1, 1 + grid[0] * grid[1], 16)
    torch.testing.assert_close(tokens.x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("height, width, grid", [(24, 48, (3, 6)), (32, 32, (4, 4)), (50, 17, (6, 2))])
def test_sequence_resample_is_the_official_linear_interpolation(height: int, width: int, grid: tuple[int, int]):
    """AVE/nets/my_vit.py (forward_patch): the whole 1 + 16 position sequence, CLS included, linearly
    interpolated to the new token count; the rows / columns past the last whole patch are unused."""
    vit = tiny_vit("sequence")
    pos = vit.vit.pos_embed.detach().clone()
    tokens = added_positions(vit, height, width)
    assert (tokens.layout.h, tokens.layout.w) == grid
    torch.testing.assert_close(tokens.x, linear_along_sequence(pos, 1 + grid[0] * grid[1]), rtol=1e-6, atol=1e-6)
    if grid == (4, 4):
        assert torch.equal(tokens.x, pos)    # the model's own size: the embedding as it is


def test_official_spectrogram_runs_through_the_vit_on_a_6_by_8_grid():
    torch.manual_seed(0)
    vit = TimmViT("vit_tiny_patch16_224", depth=1, embed_dim=16, num_heads=2, pos_resample="sequence")
    image = SpectrogramImage(orientation="time_rows", **FBANK)(waveform())        # (2, 3, 1, 102, 128)
    out = vit(image)
    assert (out.layout.t, out.layout.h, out.layout.w, out.layout.extras) == (1, 6, 8, 1)
    assert out.x.shape == (2, 1 + 6 * 8, 16) and torch.isfinite(out.x).all()
    with pytest.raises(Exception, match="102"):
        TimmViT("vit_tiny_patch16_224", depth=1, embed_dim=16, num_heads=2)(image)  # fixed size: refused
    with pytest.raises(ValueError, match="unknown pos_resample 'linear'"):
        TimmViT("vit_tiny_patch16_224", depth=1, embed_dim=16, num_heads=2, pos_resample="linear")


# the recipes ------------------------------------------------------------------------------------

def small_lavish_vitb16():
    """lavish_vitb16 with a 1-layer, 64-wide ViT: every other setting as in the recipe."""
    torch.manual_seed(0)
    return fusionkit.build("lavish_vitb16", ["experts.video.depth=1", "experts.video.embed_dim=64",
                                             "experts.video.num_heads=2"]).eval()


def test_lavish_vitb16_forward_on_the_unresized_spectrogram():
    model = small_lavish_vitb16()
    batch = {"video": torch.randn(2, 3, 1, 224, 224), "audio": waveform()}
    with torch.no_grad():
        tokens = model.forward_tokens(batch)
        logits = model(batch)
    audio, video = tokens["audio"].layout, tokens["video"].layout
    assert (audio.t, audio.h, audio.w) == (1, 6, 8) and (video.t, video.h, video.w) == (1, 14, 14)
    assert tokens["audio"].x.shape == (2, 49, 64)
    assert logits["event"].shape == (2, 29) and torch.isfinite(logits["event"]).all()


def test_lavish_vitb16_pools_cls_and_concatenates_audio_first():
    """forward_vit: ``cat(a_cls, v_cls)`` of the final-normed CLS tokens -> mlp_class -> mlp_class_2."""
    model = small_lavish_vitb16()
    assert model.experts["video"].pool_mode == "cls" and model.experts["audio"].pool_mode == "cls"
    head = model.heads["event"]
    assert list(head.inputs) == ["audio", "video"]
    batch = {"video": torch.randn(2, 3, 1, 224, 224), "audio": waveform()}
    with torch.no_grad():
        tokens = model.forward_tokens(batch)
        cls = torch.cat([tokens["audio"].x[:, 0], tokens["video"].x[:, 0]], dim=-1)
        expected = head.fc2(head.fc1(cls))
        torch.testing.assert_close(model(batch)["event"], expected)


@pytest.mark.parametrize("recipe", LAVISH)
def test_lavish_recipes_gate_the_compression(recipe: str):
    with MetaMode(build=True):
        model = fusionkit.build(recipe)
    gates = {k: v for k, v in model.state_dict().items() if k.endswith(".latent_gate")}
    n_adapters = sum(k.endswith(".fusion_gate") for k in model.state_dict())
    assert len(gates) == n_adapters == 4 * len(model.fusions["lavish"])
    assert all(model.get_parameter(k).requires_grad for k in gates)


def test_binding_benchmark_keeps_the_ungated_compression():
    with MetaMode(build=True):
        model = fusionkit.build("binding/lavish")
    assert not any(k.endswith(".latent_gate") for k in model.state_dict())


@pytest.mark.parametrize("recipe", LAVISH)
def test_training_section_follows_the_paper(recipe: str):
    """LAVISH §4: Adam, adapter learning rate 5e-6 on AVE; epochs and batch from AVE/run_v2.sh."""
    cfg = train_config(load_recipe(recipe))
    assert cfg["lr"] == 5e-6 and cfg["schedule"] == "constant" and cfg["warmup_epochs"] == 0
    assert cfg["weight_decay"] == 0 and cfg["layer_decay"] == 1.0
    assert cfg["epochs"] == 50 and cfg["batch_size"] == 20
