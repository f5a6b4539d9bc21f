"""MMS: pruning keeps the adapters of the kept layers, in the model and in every adapter.<lang>.safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2ForCTC

from comflp.model import skip_layers

from conftest import run_comflp, save_plain, tiny_model

PRUNED = [2, 5]


def test_adapter_files_are_pruned_with_the_model(tmp_path: Path) -> None:
    model = tiny_model("wav2vec2-stable", seed=3, adapter_attn_dim=8)  # MMS: adapters live in stable-layer-norm layers
    src = save_plain(model, tmp_path / "mms", tmp_path / "proc")
    for lang, seed in (("cmn", 1), ("eng", 2)):  # two languages, each with its own adapter weights and head
        torch.manual_seed(seed)
        save_file({k: torch.randn_like(v).contiguous() for k, v in model._get_adapters().items()},
                  str(src / f"adapter.{lang}.safetensors"))
    out = run_comflp("prune", "--model", str(src), "--layers", ",".join(map(str, PRUNED)),
                     "--output", str(tmp_path / "pruned"))
    assert out.returncode == 0, out.stderr
    assert "2 adapter file(s)" in out.stdout
    x = torch.randn(2, 8000)
    for lang in ("cmn", "eng"):
        pruned_file = load_file(str(tmp_path / "pruned" / f"adapter.{lang}.safetensors"))
        source_file = load_file(str(src / f"adapter.{lang}.safetensors"))
        # layer 3 of the source (0-based 2) is layer 1 of the pruned model
        key = "wav2vec2.encoder.layers.{}.adapter_layer.linear_1.weight"
        assert torch.equal(pruned_file[key.format(1)], source_file[key.format(2)])
        assert not any(f".layers.{i}." in k for k in pruned_file for i in (4, 5))
        # plain transformers loads the pruned model with that language: what the source computes without the layers
        reference = Wav2Vec2ForCTC.from_pretrained(src, target_lang=lang, ignore_mismatched_sizes=True).eval()
        pruned = Wav2Vec2ForCTC.from_pretrained(tmp_path / "pruned", target_lang=lang, ignore_mismatched_sizes=True)
        with torch.no_grad(), skip_layers(reference, PRUNED):
            expected = reference(x).logits
        with torch.no_grad():
            torch.testing.assert_close(pruned.eval()(x).logits, expected, rtol=0, atol=1e-5)


def test_a_corrupt_adapter_file_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    src = save_plain(tiny_model("wav2vec2-stable", seed=3, adapter_attn_dim=8), tmp_path / "mms", tmp_path / "proc")
    (src / "adapter.cmn.safetensors").write_bytes(b"\x00" * 40)
    out = run_comflp("prune", "--model", str(src), "--layers", "2", "--output", str(tmp_path / "pruned"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "adapter.cmn.safetensors" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "pruned").exists()
