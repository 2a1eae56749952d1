"""Batches declare their modalities; an expert whose modality no producer or data spec gives is named
before the first step."""

import pytest
import torch

from fusionkit.data.collate import collate
from fusionkit.engine.loading import modality_tensors
from fusionkit.engine.trainer import train
from fusionkit.recipes import RecipeError


def test_collate_keeps_the_declared_modalities_and_rejects_a_mixture():
    item = {"video": torch.zeros(3, 2, 4, 4), "span": torch.zeros(2), "modalities": ("video",), "clip_id": "a"}
    batch = collate([item, dict(item, clip_id="b")])
    assert batch["modalities"] == ["video"]
    assert list(modality_tensors(batch)) == ["video"]  # span is metadata, not fed to the model
    with pytest.raises(ValueError, match="items declare different modalities"):
        collate([dict(item, audio=torch.zeros(8)), dict(item, audio=torch.zeros(8), modalities=("video", "audio"))])
    with pytest.raises(ValueError, match="declares the modality 'audio' but has no tensor"):
        collate([dict(item, modalities=("video", "audio"))])


def test_a_modality_without_inputs_entry_says_what_a_new_one_needs(tmp_path):
    with pytest.raises(RecipeError, match=r"expert 'spatial' reads modality 'depth' but the recipe's inputs give only "
                                          r"\['audio', 'video'\]: a new modality needs an entry inputs.depth"):
        train("tiny", ["experts.spatial.modality=depth"], output_dir=tmp_path / "c", progress=False)


def test_an_unregistered_modality_is_named_before_the_first_step(tmp_path):
    with pytest.raises(RecipeError, match=r"experts.spatial reads the modality 'depth', which no data producer "
                                          r"gives \(registered modalities: audio, iframe, motion, residual, video\)"):
        train("tiny", ["experts.spatial.modality=depth", "inputs.depth=[3,4,32,32]"], output_dir=tmp_path / "a", progress=False)


def test_a_modality_the_data_spec_does_not_give_is_named_with_the_fix(tmp_path):
    with pytest.raises(RecipeError, match=r"experts.spatial reads the modality 'motion' but data.train "
                                          r"\(SyntheticDataset\) gives only video, audio: use a dataset that produces it"):
        train("tiny", ["experts.spatial.modality=motion", "inputs.motion=[3,4,32,32]"], output_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
