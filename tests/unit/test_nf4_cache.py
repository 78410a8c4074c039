"""The quantised copy of a base model: loads from it carry the same bytes and give the same outputs as quantising
the base afresh; a damaged or unfinished copy is found, removed and built again."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from shared.basemodels.marker import VERIFIED_MARKER
from worker.training import quantised_copy
from worker.training.model import load_base_model


@pytest.fixture
def base(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "base", ignore=shutil.ignore_patterns(".*")))


def copies(base: Path) -> list[Path]:
    return sorted((base / quantised_copy.COPIES).iterdir()) if (base / quantised_copy.COPIES).is_dir() else []


def state_bytes(model) -> dict[str, bytes]:
    return {name: t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for name, t in model.state_dict().items()}  # fmt: skip


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits in eval mode, and the gradient training would take through the 4-bit weights to the inputs."""
    ids = torch.arange(5, 37).reshape(2, 16)
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()
    embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embedded).logits.float().square().mean().backward()
    return evaluated, embedded.grad


def loaded_from(model) -> Path:
    return Path(model.config._name_or_path)


def test_a_load_from_the_copy_equals_a_fresh_quantisation(base):
    fresh = load_base_model(base, "nf4")
    assert loaded_from(fresh) == base
    [copy] = copies(base)
    assert (copy / quantised_copy.CONTENTS).is_file()
    again = load_base_model(base, "nf4")
    assert loaded_from(again) == copy
    assert type(again.model.layers[0].self_attn.q_proj) is type(fresh.model.layers[0].self_attn.q_proj)
    assert state_bytes(again) == state_bytes(fresh)
    for ours, theirs in zip(outputs(again), outputs(fresh), strict=True):
        assert torch.equal(ours, theirs)
    # The key came from the verified sha256 of the base's weights, recorded for the next load.
    assert "model.safetensors" in json.loads((base / VERIFIED_MARKER).read_text())


def test_each_setting_has_a_copy_of_its_own(base):
    load_base_model(base, "nf4")
    load_base_model(base, "fp4")
    assert len(copies(base)) == 2
    load_base_model(base, "int8")  # 8-bit is quantised on every load, as is the unquantised base
    load_base_model(base, "none")
    assert len(copies(base)) == 2


def test_a_changed_base_gets_a_new_copy(base):
    load_base_model(base, "nf4")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    model = load_base_model(base, "nf4")
    assert loaded_from(model) == base
    assert len(copies(base)) == 2


def test_a_damaged_copy_is_built_again(base):
    fresh = state_bytes(load_base_model(base, "nf4"))
    [copy] = copies(base)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)  # same size: only the recorded sha256 can tell
    weights.write_bytes(bytes(data))
    rebuilt = load_base_model(base, "nf4")
    assert loaded_from(rebuilt) == base
    assert state_bytes(rebuilt) == fresh
    assert copies(base) == [copy]
    assert state_bytes(load_base_model(base, "nf4")) == fresh


def test_an_unfinished_copy_is_never_used(base):
    load_base_model(base, "nf4")
    [copy] = copies(base)
    (copy / quantised_copy.CONTENTS).unlink()  # as if the write stopped before it completed
    model = load_base_model(base, "nf4")
    assert loaded_from(model) == base
    assert copies(base) == [copy] and (copy / quantised_copy.CONTENTS).is_file()


def test_a_copy_without_the_model_is_never_used_nor_written(base):
    # Under torchrun, transformers saves on rank 0 only: another rank's save leaves an empty folder, which must
    # neither be kept as a copy nor, found in place, be read as one.
    load_base_model(base, "nf4")
    [copy] = copies(base)
    shutil.rmtree(copy)
    copy.mkdir()
    (copy / quantised_copy.CONTENTS).write_text("{}")
    model = load_base_model(base, "nf4")
    assert loaded_from(model) == base
    assert copies(base) == [copy] and quantised_copy.is_whole(copy)

    class SavesNothing:
        def save_pretrained(self, folder, **_):
            Path(folder).mkdir(parents=True)

    shutil.rmtree(copy)
    quantised_copy.write(SavesNothing(), copy)
    assert copies(base) == []  # neither a copy nor a partial folder left
