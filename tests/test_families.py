"""The family table, class by class: every CTC family through every command (a tiny random model goes measure ->
search -> prune -> test, GLP, healing); the speech-LLM classes (Qwen2-Audio, Voxtral, Qwen3-ASR, GLM-ASR,
Granite Speech and Speech Plus) pruned in either stack equal to their layers switched off under cached
generation, every per-layer config field following the kept layers, plain reload. What each class does through
the commands: test_speechllm.py (speech-LLMs), test_moonshine.py, test_whisper.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCTC, AutoModelForMultimodalLM

from comflp.errors import ComflpError

from comflp.cli import finetune
from comflp.cli import measure as analysis, model as cli, search as search_cli, testset as testset_cli
from comflp.model import family_of, front_end, load_model, num_layers, prune, stack_config, stack_layers

from conftest import FAMILIES, make_corpus, save_plain, tiny_model
from tiny_speechllm import ENCODER_SETS, SPEECH_LLMS, audio_prompt, run_prompt, tiny_speech_llm


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("families") / "corpus", n=6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_search_prune_test(family: str, corpus: Path, tmp_path: Path) -> None:
    model = save_plain(tiny_model(family, seed=7), tmp_path / "model", tmp_path / "proc")
    npz = tmp_path / "m.npz"
    analysis.main(["--model", str(model), "--data_dir", str(corpus), "--batch_size", "3", "--iter_num", "2",
                   "--measures", "cosine,dc", "--no_plot", "--quiet", "--dump_dir", str(tmp_path), "--output", str(npz)])
    strategy = tmp_path / "s.json"
    search_cli.main(["--model", str(model), "--measure_file", str(npz), "--num_layers", "6", "--num_clip_layers", "2",
                     "--search_mode", "exact", "--topk_num", "3", "--verify_data_dir", str(corpus),
                     "--test_num_batch", "2", "--verify_batch_size", "3", "--log_dir", str(tmp_path), "--quiet",
                     "--output", str(strategy)])
    pick = json.loads(strategy.read_text())["candidates"][0]
    pruned = tmp_path / "pruned"
    cli.prune_main(["--model", str(model), "--strategy", str(strategy), "--rank", "1", "--output", str(pruned)])
    reloaded, info = AutoModelForCTC.from_pretrained(pruned, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = testset_cli.main(["--model", str(pruned), "--data_dir", str(corpus), "--batch_size", "1",
                               "--output_dir", str(tmp_path / "test")])
    assert report["num_layers"] == 4 and 0 <= report["error_rate"]
    # the saved pruned model scores the CER the fine search measured by switching layers off in batches of 3
    # (the subset is the whole corpus; every family decodes the same at any batch size)
    assert report["error_rate"] == pytest.approx(pick["cer"], abs=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_glp_then_finetune(family: str, corpus: Path, tmp_path: Path) -> None:
    """GLP picks layers by real CER, and fine-tuning (CTC + distillation) heals the pruned model of every family."""
    model = save_plain(tiny_model(family, seed=7), tmp_path / "model", tmp_path / "proc")
    glp = search_cli.glp_main(["--model", str(model), "--verify_data_dir", str(corpus), "--num_layers", "6",
                               "--num_clip_layers", "2", "--test_num_batch", "1", "--verify_batch_size", "3",
                               "--log_dir", str(tmp_path), "--quiet", "--output", str(tmp_path / "g.json")])
    pick = glp.candidates[0].pruned
    assert len(pick) == 2
    out = tmp_path / "ft"
    finetune.main(["--model", str(model), "--layers", ",".join(map(str, pick)), "--batch_size", "3", "--epochs", "1",
                   "--lr", "1e-3", "--test_num_batch", "1", "--valid_batch_size", "3", "--train_data_dir", str(corpus),
                   "--valid_data_dir", str(corpus), "--output_dir", str(out), "--threads", "1", "--quiet",
                   "--freeze_feature_encoder"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and len(rows) == 2 and math.isfinite(rows[1]["train_loss"])
    healed, info = AutoModelForCTC.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and num_layers(healed) == 4
    before = load_model(model).model.state_dict()
    front = front_end(healed)
    front_prefix = next(name for name, m in healed.named_modules() if m is front) + "."
    changed = {k for k, v in healed.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed and not any(k.startswith(front_prefix) for k in changed)  # the front end stayed frozen


@pytest.mark.parametrize("family", SPEECH_LLMS)
def test_pruned_equals_switched_off_with_cached_generation(family: str) -> None:
    from test_whisper import _with_identity

    model = tiny_speech_llm(family)
    ids, audio = audio_prompt(model)
    for encoder, decoder in ((ENCODER_SETS.get(family, [2, 4]), []), ([], [1, 3]), (ENCODER_SETS.get(family, [3]), [2])):
        pruned = prune(model, encoder, decoder_pruned=decoder)
        handles = _with_identity(model, encoder, decoder)
        try:
            ref_logits, ref_seq, ref_scores = run_prompt(model, ids, audio)
        finally:
            for h in handles:
                h.remove()
        logits, seq, scores = run_prompt(pruned, ids, audio)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
        assert (num_layers(pruned), num_layers(pruned, "decoder")) == (4 - len(encoder), 4 - len(decoder))
        # the kept LLM layers carry their new cache index; the source keeps its own
        assert [layer.self_attn.layer_idx for layer in stack_layers(pruned, "decoder")] == list(range(4 - len(decoder)))
    assert [layer.self_attn.layer_idx for layer in stack_layers(model, "decoder")] == [0, 1, 2, 3]
    # the source's config and modules are as they were
    assert (num_layers(model), stack_config(model, "decoder").num_hidden_layers) == (4, 4)


def _per_layer_lists(config: dict, depth: int, path: str = "") -> dict[str, int]:
    """Every list in a config dict (sub-configs too) whose length is ``depth``: its dotted path -> length."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_per_layer_lists(value, depth, f"{path}{key}."))
        elif isinstance(value, list) and len(value) == depth:
            out[f"{path}{key}"] = len(value)
    return out


@pytest.mark.parametrize("family", SPEECH_LLMS)
def test_every_per_layer_list_of_the_pruned_config_has_the_new_depth(family: str, tmp_path: Path) -> None:
    """Any list in the source config with one entry per layer (of either stack) has one per kept layer after
    pruning (an LLM's layer_types; checked over every sub-config, so a field the family table misses fails)."""
    from comflp.cli import model as cli

    model = tiny_speech_llm(family)
    model.save_pretrained(tmp_path / "src")
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    encoder, decoder = ENCODER_SETS.get(family, [3]), [1, 3]
    cli.prune_main(["--model", str(tmp_path / "src"), "--layers", ",".join(map(str, encoder)),
                    "--decoder_layers", ",".join(map(str, decoder)), "--output", str(tmp_path / "p")])
    pruned = json.loads((tmp_path / "p" / "config.json").read_text())
    lists = _per_layer_lists(source, 4)
    if family == "qwen2_audio":
        assert "text_config.layer_types" in lists
    for path in lists:
        value = pruned
        for key in path.split("."):
            value = value[key]
        assert len(value) == (4 - len(decoder) if path.startswith("text_config") else 4 - len(encoder)), path
    reloaded, info = AutoModelForMultimodalLM.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, audio = audio_prompt(model, seed=1)
    expected = prune(model, encoder, decoder_pruned=decoder)
    got, want = run_prompt(reloaded.eval(), ids, audio), run_prompt(expected, ids, audio)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    assert torch.equal(got[1], want[1])


def test_sliding_window_layers_keep_their_attention_type() -> None:
    """Qwen2's first max_window_layers layers attend fully, the rest in a sliding window: the pruned config's
    layer_types are the kept layers' own, and max_window_layers counts the kept full-attention layers."""
    model = tiny_speech_llm("qwen2_audio")
    text = stack_config(model, "decoder")
    assert text.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    pruned = prune(model, [], decoder_pruned=[2, 3])
    assert stack_config(pruned, "decoder").layer_types == ["full_attention", "sliding_attention"]
    assert stack_config(pruned, "decoder").max_window_layers == 1
    assert [layer.self_attn.layer_type for layer in stack_layers(pruned, "decoder")] == ["full_attention", "sliding_attention"]
    assert text.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert text.max_window_layers == 2


@pytest.mark.parametrize("family", ["granite_speech", "granite_speech_plus"])
def test_granite_ctc_feedback_must_stay_after_the_same_kept_layer(family: str) -> None:
    """Granite feeds its CTC output back after encoder layer depth // 2. Without layer 3 of 4 that point (after
    source layer 2, kept layer 2) is no longer after the pruned 3-layer encoder's layer 3 // 2 = 1: refused in
    one line, in memory (the fine search) and when pruning, and the source is left as it was."""
    from comflp.model import skip_layers

    model = tiny_speech_llm(family)
    for attempt in (lambda: prune(model, [3]), lambda: skip_layers(model, [3]).__enter__()):
        with pytest.raises(ComflpError, match=r"feeds its CTC output back after layer 2 of 4.*remove 1 layer\(s\) among 1\.\.2"):
            attempt()
    assert num_layers(model) == 4 and model.model.encoder.num_layers == 4
    assert stack_config(model, "encoder").num_layers == 4
    # without layers 1 and 4 it stays after source layer 2 (kept layer 1 of 2): allowed, and the module's own
    # copy of the depth follows
    pruned = prune(model, [1, 4])
    assert pruned.model.encoder.num_layers == 2 and stack_config(pruned, "encoder").num_layers == 2


def test_granite_plus_concatenated_states_follow_the_kept_layers() -> None:
    model = tiny_speech_llm("granite_speech_plus")
    pruned = prune(model, [1])  # states 0 and 2 of the source are states 0 and 1 of the pruned encoder
    assert stack_config(pruned, "encoder").cat_hidden_layers == [0, 1]
    assert stack_config(model, "encoder").cat_hidden_layers == [0, 2]
    with pytest.raises(ComflpError, match=r"concatenates its hidden states \[0, 2\].*two of them become one"):
        prune(model, [1, 2])  # state 2 would be the encoder's input, state 0


def _issue_classes():
    """A tiny model of each class the speech-LLM issue names: the six speech-LLMs, Moonshine and LASR."""
    from test_moonshine import tiny_moonshine

    yield from ((family, tiny_speech_llm(family)) for family in SPEECH_LLMS)
    yield "moonshine", tiny_moonshine()
    yield "lasr_ctc", tiny_model("lasr_ctc")


def test_the_family_table_knows_each_class() -> None:
    """Each class has its entry: the head kind, stacks whose depth fields (in the sub-configs the table names)
    count the layers at the table's paths, and an auto class that transformers maps to the class itself."""
    import transformers

    from comflp.heads import head_of

    for family, model in _issue_classes():
        entry = family_of(model)
        assert model.config.model_type == family and head_of(model).name == entry.kind
        stacks = ("encoder", "decoder") if entry.kind != "ctc" else ("encoder",)
        assert tuple(entry.stacks) == stacks, family
        for stack in stacks:
            depth = getattr(stack_config(model, stack), entry.stacks[stack].depth_field)
            assert len(stack_layers(model, stack)) == num_layers(model, stack) == depth > 1, (family, stack)
        auto = getattr(transformers, entry.auto_class)
        assert auto._model_mapping[type(model.config)] is type(model), family
        if entry.kind == "speechllm":
            assert entry.decoder.config == "text_config" and entry.stack_aliases == ("audio", "llm")
