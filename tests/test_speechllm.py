"""Speech-LLMs through comflp's speech-LLM head: decoding by the chat prompt at any batch size, the fine search
of either stack, measuring both stacks, GLP, healing (CE + distillation on the transcript), --instruction.
(Their family-table entries, pruning and reload: test_families.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transformers import AutoModelForMultimodalLM

from comflp.model import prune

from tiny_speechllm import (AUDIO_TOKEN, FEATURE_MASK, VOCAB, WITH_PROCESSORS, qwen2_audio_dir, speech_llm_dir,
                            tiny_speech_llm)


def alone_inputs(model, processor, path: Path, request: str = "Transcribe the audio.", language: str | None = None
                 ) -> dict:
    """Plain transformers' inputs for one audio file: the processor's chat prompt around its audio (Voxtral's
    processor reads the file itself, inside the chat turn, in windows of its tower's size; Qwen3-ASR's makes
    its own transcription request)."""
    from comflp.data import load_audio

    if model.config.model_type == "qwen3_asr":
        return processor.apply_transcription_request(load_audio(path, 16000), language=language)
    if model.config.model_type == "voxtral":  # its transcription mode; with a request of one's own, a chat turn
        window = {"max_source_positions": 2 * model.config.audio_config.max_source_positions,
                  "pad_to_multiple_of": 2 * model.config.audio_config.max_source_positions * 160}
        if request == "Transcribe the audio.":
            return processor.apply_transcription_request(audio=str(path), model_id="voxtral", language=language,
                                                         audio_kwargs=window)
        turn = [{"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": request}]}]
        return processor.apply_chat_template(turn, tokenize=True, return_dict=True,
                                             processor_kwargs={"audio_kwargs": window})
    turn = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": request}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[load_audio(path, 16000)], sampling_rate=16000, return_tensors="pt")


def _decoded(model, processor, ids) -> list[str]:
    """The transcripts as each model card says to read them: Qwen3-ASR's after its language tag, GLM-ASR's
    without its framing sentence, the others' as decoded."""
    family = model.config.model_type
    if family == "qwen3_asr":
        return processor.decode(ids, return_format="transcription_only")
    if family == "glmasr":
        return processor.decode(ids, skip_special_tokens=True, strip_prefix=True)
    return processor.batch_decode(ids, skip_special_tokens=True)


def _alone(model, processor, utts, max_new_tokens: int, language: str | None = None) -> list[str]:
    """Independent reference: plain transformers, one utterance at a time (the processor's prompt around its
    audio, greedy generation, the new tokens decoded)."""
    request = getattr(processor, "default_transcription_prompt", None) or "Transcribe the audio."
    out = []
    for u in utts:
        inputs = alone_inputs(model, processor, u.path, request, language)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answer = _decoded(model, processor, ids[:, inputs["input_ids"].shape[1]:])[0]
        out.append(" ".join(answer.split()))  # one line per transcript, as comflp writes them
    return out


@pytest.mark.parametrize("family", WITH_PROCESSORS)
def test_a_speech_llm_decodes_what_it_decodes_alone_at_any_batch_size(family: str, tmp_path: Path) -> None:
    """`comflp test` of a speech-LLM: the chat prompt around each utterance's audio, greedy generation; the
    same transcripts at batch 1 and 4 (rows left-padded) as plain transformers gives one utterance at a time."""
    from conftest import make_corpus, run_comflp

    from comflp.data import read_corpus_dir
    from comflp.model import load_model

    model_dir, corpus = speech_llm_dir(tmp_path, family), make_corpus(tmp_path / "corpus", n=5)
    hyps = []
    for bs in (1, 4):
        result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", str(bs),
                            "--output_dir", str(tmp_path / f"test{bs}"))
        assert result.returncode == 0, result.stderr
        hyps.append((tmp_path / f"test{bs}" / "hyp.txt").read_text(encoding="utf-8"))
    assert hyps[0] == hyps[1]
    loaded = load_model(model_dir, allow_encoder_decoder=True, need_tokenizer=True)
    utts = read_corpus_dir(corpus)
    from comflp.heads import head_of

    limit = head_of(loaded.model).generation_limit(loaded.model, loaded.tokenizer, [u.text for u in utts])
    expected = _alone(loaded.model, loaded.tokenizer, utts, limit)
    got = dict(line.partition(" ")[::2] for line in hyps[0].splitlines())  # "utt text" (text may be empty)
    assert [got[u.utt_id].strip() for u in utts] == expected and len(set(expected)) > 1


@pytest.mark.parametrize("family,answer", [
    ("qwen3_asr", "language Chinese<asr_text>你好 世界"), ("glmasr", 'The spoken content of the audio is "你好 世界".'),
    ("qwen2_audio", "你好 世界")])
def test_transcripts_are_read_without_the_models_own_output_format(family: str, answer: str, tmp_path: Path) -> None:
    """An answer in the model's own format is scored as its transcript: Qwen3-ASR's language tag and GLM-ASR's
    framing sentence stripped by their processors (as their model cards read them), the end of turn skipped."""
    from comflp.heads import transcripts
    from comflp.model import load_model

    loaded = load_model(speech_llm_dir(tmp_path, family), allow_encoder_decoder=True, need_tokenizer=True)
    spelled = loaded.tokenizer.tokenizer(answer, add_special_tokens=False).input_ids
    assert loaded.tokenizer.tokenizer.unk_token_id not in spelled
    ids = torch.tensor([spelled + [2], spelled + [2]])  # each ends with Qwen's end of turn
    assert transcripts(loaded.model, loaded.tokenizer, ids) == ["你好 世界", "你好 世界"]


@pytest.mark.parametrize("family,stack", [(f, s) for f in WITH_PROCESSORS for s in ("encoder", "decoder")])
def test_fine_search_equals_separately_pruned_models(family: str, stack: str, tmp_path: Path, monkeypatch) -> None:
    """Switching layers of either stack off decodes what each pruned model decodes alone (plain transformers);
    the LLM's candidates share the audio tower's pass and the prompt's prefill through the kept layers they
    share, replayed, not recomputed."""
    from conftest import make_corpus

    from comflp import prefill
    from comflp.data import read_corpus_dir
    from comflp.model import load_model
    from comflp.strategy import Candidate
    from comflp.verify import FineSearch, verify

    loaded = load_model(speech_llm_dir(tmp_path, family), allow_encoder_decoder=True, need_tokenizer=True)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))
    sets = [[1], [2, 3], [4], [1, 4]]
    engine = FineSearch(loaded, utts, batch_size=2, progress=False, stack=stack)
    report = verify(engine, [Candidate(s) for s in sets])
    towers, prefills = [], []
    made = prefill.PromptPrefills.__init__

    def recorded(self, *args, **kwargs):
        made(self, *args, **kwargs)
        prefills.append(self)

    monkeypatch.setattr(prefill.PromptPrefills, "__init__", recorded)
    handle = loaded.model.model.audio_tower.register_forward_hook(lambda *a: towers.append(1))
    try:
        transcribed = engine.transcribe(sets)
    finally:
        handle.remove()
    # the LLM's candidates share the audio tower's output: it runs once per batch (3 batches of 5 utterances)
    assert len(towers) == (3 if stack == "decoder" else 3 * len(sets))
    # kept (0, 1, 2), (0, 3), (1, 2), (1, 2, 3) in turn: (0, 3) replays layer 0, (1, 2, 3) layers 1 and 2
    assert [(p.replayed_layers, p.computed_layers) for p in prefills] == ([(3, 7)] * 3 if stack == "decoder" else [])
    distinct = set()
    for s, hyps in zip(sets, transcribed):
        model = prune(loaded.model, s if stack == "encoder" else [], decoder_pruned=s if stack == "decoder" else [])
        assert hyps == [engine.normalize(t) for t in _alone(model, loaded.tokenizer, utts, engine.max_new_tokens)]
        distinct.add(tuple(hyps))
    assert len(distinct) > 1
    assert [c.pruned for c in report.candidates] == sets


def test_glp_prune_and_test_a_speech_llm_decoder(tmp_path: Path) -> None:
    """GLP by generated CER on the LLM's layers, then the pick pruned and tested: the CER GLP measured."""
    from conftest import make_corpus
    from comflp.cli import model as cli, search as search_cli, testset as testset_cli

    model_dir, corpus = qwen2_audio_dir(tmp_path), make_corpus(tmp_path / "corpus", n=4)
    glp = search_cli.glp_main(["--model", str(model_dir), "--stack", "llm", "--verify_data_dir", str(corpus),
                               "--num_layers", "4", "--num_clip_layers", "1", "--test_num_batch", "2",
                               "--verify_batch_size", "2", "--log_dir", str(tmp_path), "--quiet",
                               "--output", str(tmp_path / "g.json")])
    pick = glp.candidates[0]
    cli.prune_main(["--model", str(model_dir), "--strategy", str(tmp_path / "g.json"), "--output", str(tmp_path / "p")])
    report = testset_cli.main(["--model", str(tmp_path / "p"), "--data_dir", str(corpus), "--batch_size", "3",
                               "--output_dir", str(tmp_path / "test")])
    assert json.loads((tmp_path / "g.json").read_text())["stack"] == "decoder"  # --stack llm: the LLM's layers
    assert json.loads((tmp_path / "p" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    assert report["error_rate"] == pytest.approx(pick.cer, abs=1e-12)


def test_stack_names_audio_and_llm_mean_a_speech_llms_tower_and_llm(tmp_path: Path) -> None:
    """`--stack audio` measures what `--stack encoder` measures (the audio tower), into the same file name;
    `--stack llm` on a CTC model, or on Whisper, is refused in one line naming the model's stacks."""
    from conftest import make_corpus, run_comflp, save_plain, tiny_model
    from test_whisper import _measure

    model, corpus = qwen2_audio_dir(tmp_path), make_corpus(tmp_path / "corpus", n=4)
    by_alias = np.load(_measure(model, corpus, tmp_path / "a" / "m.npz", stack="audio"))
    by_name = np.load(_measure(model, corpus, tmp_path / "e" / "m.npz", stack="encoder"))
    assert np.array_equal(by_alias["cosine"], by_name["cosine"]) and by_alias["cosine"].shape == (5, 5)
    ctc = save_plain(tiny_model("wav2vec2"), tmp_path / "ctc", tmp_path / "proc")
    for argv in (["measure", "--model", str(ctc), "--stack", "llm"],
                 ["glp", "--model", str(ctc), "--stack", "audio", "--num_layers", "6", "--num_clip_layers", "1"]):
        result = run_comflp(*argv, "--data_dir" if argv[0] == "measure" else "--verify_data_dir", str(corpus),
                            "--dump_dir" if argv[0] == "measure" else "--log_dir", str(tmp_path / "x"), "--quiet")
        last = result.stderr.strip().splitlines()[-1]  # after transformers' weight-loading bar
        assert result.returncode == 2 and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
        assert "names a speech-LLM's stack" in last and last.endswith("has: encoder"), result.stderr


@pytest.mark.parametrize("family,stack", [(f, s) for f in WITH_PROCESSORS for s in ("encoder", "decoder")])
def test_measure_each_stack_at_any_batch_size(family: str, stack: str, tmp_path: Path) -> None:
    """The LLM measured under teacher forcing inside the chat prompt, the audio tower at its real frames: the
    same matrices at batch 3 and 1."""
    from conftest import make_corpus
    from test_whisper import measured_alike_at_batch_sizes

    measured_alike_at_batch_sizes(speech_llm_dir(tmp_path, family), make_corpus(tmp_path / "corpus", n=6), tmp_path,
                                  stack)


def test_captured_states_are_the_models_own_at_the_transcripts_tokens(tmp_path: Path) -> None:
    """Teacher forcing: each row is the processor's prompt, the transcript's tokens and the end token; the LLM
    states comflp pools are plain transformers' hidden states at the transcript's tokens of each utterance alone,
    and the audio tower's at its real frames."""
    from conftest import make_corpus

    from comflp.data import collate, read_corpus_dir
    from comflp.heads import chat_prompt, end_token
    from comflp.hidden import capture_layer_states, forward_stack
    from comflp.model import load_model

    loaded = load_model(qwen2_audio_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    model, processor = loaded.model, loaded.tokenizer
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=3))
    batch = collate(utts, loaded.feature_extractor)
    with torch.no_grad():
        with capture_layer_states(model, "decoder") as states:
            mask = forward_stack(model, batch, states, "decoder", tokenizer=processor)
            dec = list(states)
        with capture_layer_states(model, "encoder") as states:
            frames = forward_stack(model, batch, states, "encoder", tokenizer=processor)
            enc = list(states)
        for i, u in enumerate(utts):
            alone = processor(text=chat_prompt(model, processor), audio=[batch.waves[i]], sampling_rate=16000,
                              return_tensors="pt")
            spelled = processor.tokenizer(u.text, add_special_tokens=False).input_ids
            ids = torch.cat([alone["input_ids"], torch.tensor([spelled + [end_token(model, processor.tokenizer)]])], 1)
            own = model(input_ids=ids, input_features=alone["input_features"],
                        feature_attention_mask=alone["feature_attention_mask"], output_hidden_states=True)
            start = alone["input_ids"].shape[1]
            assert int(mask[i].sum()) == len(spelled) and bool(mask[i, start]) and not bool(mask[i, start - 1])
            for layer in range(4):  # HF's last state is after the final norm; comflp's is the layer's output
                torch.testing.assert_close(dec[layer][i][mask[i]], own.hidden_states[layer][0, start: start + len(spelled)],
                                           rtol=1e-4, atol=1e-4)
            # the tower's real frames: half the real mel frames (its stride-2 conv)
            assert int(frames[i].sum()) == (int(alone["feature_attention_mask"].sum()) - 1) // 2 + 1
            assert enc[0].shape[1] == 50


@pytest.mark.parametrize("family", ["glmasr", "qwen3_asr", "voxtral"])
def test_captured_tower_states_are_the_towers_own_at_its_real_frames(family: str, tmp_path: Path) -> None:
    """The audio tower's states comflp pools, in a batch of utterances of different lengths, are plain
    transformers' tower states of each utterance alone at its real frames (Qwen3-ASR's tower packs every
    utterance's frames into one sequence, Voxtral's runs windows of 0.64 s here: comflp joins each utterance's
    back); padding frames are not counted.
    (Qwen2-Audio's: test_captured_states_are_the_models_own_at_the_transcripts_tokens.)"""
    from conftest import make_corpus

    from comflp.data import collate, read_corpus_dir
    from comflp.hidden import capture_layer_states, forward_stack
    from comflp.model import load_model

    loaded = load_model(speech_llm_dir(tmp_path, family), allow_encoder_decoder=True, need_tokenizer=True)
    model, processor = loaded.model, loaded.tokenizer
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=3))
    batch = collate(utts, loaded.feature_extractor)
    assert len({len(w) for w in batch.waves}) == 3
    mask_key = FEATURE_MASK.get(family)
    with torch.no_grad():
        with capture_layer_states(model, "encoder") as states:
            frames = forward_stack(model, batch, states, "encoder", tokenizer=processor)
            enc = list(states)
        windows = []
        for i, u in enumerate(utts):
            alone = alone_inputs(model, processor, u.path)
            tower_inputs = {"input_features": alone["input_features"]}
            if family == "qwen3_asr":  # its tower takes the frame mask (the others read the whole window)
                tower_inputs[mask_key] = alone[mask_key]
            own = model.model.audio_tower(**tower_inputs, output_hidden_states=True).hidden_states
            real = int(frames[i].sum())
            if family == "voxtral":  # the mel frames centred inside the audio, through a stride-2 conv
                assert real == (-(-len(batch.waves[i]) // 160) - 1) // 2 + 1
                windows.append(alone["input_features"].shape[0])
            else:  # those the projector hands the LLM (one audio token per frame, or per 4 for GLM-ASR)
                tokens = int((alone["input_ids"] == AUDIO_TOKEN).sum())
                assert real // 4 == tokens if family == "glmasr" else real == tokens
            for layer in range(4):  # a packed or windowed tower's frames in order, then those of padding
                mine = enc[layer][i][frames[i]]
                theirs = own[layer].reshape(-1, own[layer].shape[-1])[:real] if family != "glmasr" else \
                    own[layer][0, :real]
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        if family == "voxtral":  # utterances of one window and of several
            assert min(windows) == 1 and max(windows) > 1


@pytest.mark.parametrize("family,stack", [("qwen2_audio", "llm"), ("glmasr", "audio"), ("qwen3_asr", "llm"),
                                          ("voxtral", "audio")])
def test_measure_search_prune_test_a_speech_llm(family: str, stack: str, tmp_path: Path) -> None:
    """measure either stack -> coarse and fine search by generated CER -> prune -> test: the CER the search
    measured."""
    from conftest import make_corpus
    from test_whisper import _measure

    from comflp.cli import model as cli, search as search_cli, testset as testset_cli

    model, corpus = speech_llm_dir(tmp_path, family), make_corpus(tmp_path / "corpus", n=6)
    npz = _measure(model, corpus, tmp_path / "m.npz", stack=stack)
    strategy = tmp_path / "s.json"
    search_cli.search_main(["--model", str(model), "--measure_file", str(npz), "--num_layers", "4",
                            "--num_clip_layers", "2", "--select_measure", "cosine", "--search_mode", "exact",
                            "--topk_num", "3", "--verify_data_dir", str(corpus), "--test_num_batch", "2",
                            "--verify_batch_size", "3", "--log_dir", str(tmp_path), "--quiet", "--output", str(strategy)])
    written = json.loads(strategy.read_text())
    assert written.get("stack", "encoder") == {"audio": "encoder", "llm": "decoder"}[stack] \
        and len(written["candidates"]) == 3
    cli.prune_main(["--model", str(model), "--strategy", str(strategy), "--output", str(tmp_path / "p")])
    report = testset_cli.main(["--model", str(tmp_path / "p"), "--data_dir", str(corpus), "--batch_size", "2",
                               "--output_dir", str(tmp_path / "test")])
    assert report["error_rate"] == pytest.approx(written["candidates"][0]["cer"], abs=1e-12)


def test_an_unmeasurable_tower_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """A family whose audio frames the table does not count cannot have its tower measured (its LLM can): one
    line, nothing written."""
    import dataclasses

    from conftest import make_corpus, run_comflp

    from comflp.model import families

    model_dir, corpus = qwen2_audio_dir(tmp_path), make_corpus(tmp_path / "corpus", n=3)
    monkeypatch.setitem(families.FAMILIES, "qwen2_audio",
                        dataclasses.replace(families.FAMILIES["qwen2_audio"], audio_frames=None))
    result = run_comflp("measure", "--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", "1",
                        "--iter_num", "3", "--measures", "cosine", "--no_plot", "--output", str(tmp_path / "x.npz"))
    assert result.returncode == 2 and "measuring the audio tower of a qwen2_audio model is not offered" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("family", ["qwen2_audio", "voxtral"])
def test_heal_a_pruned_speech_llm_and_test_it(family: str, tmp_path: Path) -> None:
    """Healing a speech-LLM: cross-entropy on the transcript's tokens inside its prompt (Qwen2-Audio's chat
    template, Voxtral's transcription request) plus distillation from the unpruned teacher; the checkpoints
    are plain and `comflp test` decodes them."""
    from conftest import make_corpus

    from comflp.cli import finetune, testset as testset_cli

    texts = ["你好世界", "我们是人", "你好", "世界的人", "我是你", "好的"]
    model_dir, corpus = speech_llm_dir(tmp_path, family), make_corpus(tmp_path / "corpus", n=6, texts=texts)
    out = tmp_path / "ft"
    finetune.main(["--model", str(model_dir), "--layers", "4", "--decoder_layers", "2,3", "--batch_size", "3",
                   "--epochs", "3", "--lr", "3e-3", "--test_num_batch", "2", "--valid_batch_size", "3",
                   "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus), "--output_dir", str(out),
                   "--threads", "1", "--quiet"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and all(np.isfinite(r["train_loss"]) for r in rows[1:])
    assert rows[3]["train_loss"] < rows[1]["train_loss"]  # it learns the transcripts
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["pruned"] == [4] and settings["decoder_pruned"] == [2, 3]
    healed, info = AutoModelForMultimodalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tower_depth = getattr(healed.config.audio_config, "encoder_layers", None) or \
        healed.config.audio_config.num_hidden_layers
    assert (tower_depth, healed.config.text_config.num_hidden_layers) == (3, 2)
    report = testset_cli.main(["--model", str(out / "final"), "--data_dir", str(corpus), "--batch_size", "2",
                               "--output_dir", str(tmp_path / "test")])
    assert report["error_rate"] == pytest.approx(rows[3]["valid_cer"], abs=1e-12)


def test_distillation_compares_the_positions_that_predict_the_labels(tmp_path: Path) -> None:
    """The speech-LLM's labels are the transcript's tokens and the end token; the student's logits at t predict
    the token at t + 1, so distillation compares the positions just before each label; the model's own loss with
    those labels is its cross-entropy there."""
    from conftest import make_corpus

    from comflp.data import collate, read_corpus_dir
    from comflp.heads import head_of
    from comflp.model import load_model

    loaded = load_model(qwen2_audio_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=2))
    batch = collate(utts, loaded.feature_extractor)
    head = head_of(loaded.model)
    labels = head.labels(loaded.model, loaded.tokenizer, batch.texts, batch=batch)
    with torch.no_grad():
        output = head.student_output(loaded.model, loaded.tokenizer, batch, labels, pad_audio=False)
        teacher = head.teacher_logits(loaded.model, batch, labels, pad_audio=False, tokenizer=loaded.tokenizer)
    mask = head.distillation_mask(loaded.model, batch, labels, output.logits)
    assert int(mask.sum()) == int((labels != -100).sum())
    torch.testing.assert_close(output.logits, teacher)
    picked = output.logits[mask]  # [M, V], in row order; the tokens they predict, in the same order
    ce = torch.nn.functional.cross_entropy(picked.float(), labels[labels != -100])
    torch.testing.assert_close(output.loss, ce, rtol=1e-5, atol=1e-5)
    for i, u in enumerate(utts):
        spelled = loaded.tokenizer.tokenizer(u.text, add_special_tokens=False).input_ids
        assert labels[i][labels[i] != -100].tolist() == spelled + [2]  # the generation config's end of turn


@pytest.mark.parametrize("family", ["qwen2_audio", "granite_speech"])
def test_info_and_a_refused_prune_from_the_command_line(family: str, tmp_path: Path) -> None:
    from conftest import run_comflp

    tiny_speech_llm(family).save_pretrained(tmp_path / "m")
    result = run_comflp("info", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert all(line in result.stdout for line in (f"family: {family}", "num_layers: 4", "decoder_layers: 4",
                                                  "hidden_size: 32", f"vocab_size: {VOCAB}"))
    if family == "granite_speech":  # the CTC feedback would move: one line, nothing written
        result = run_comflp("prune", "--model", str(tmp_path / "m"), "--layers", "3", "--output", str(tmp_path / "p"))
        assert result.returncode == 2 and "feeds its CTC output back after layer 2 of 4" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "p").exists()


def test_the_instruction_is_the_one_given_everywhere(tmp_path: Path, capsys) -> None:
    """--instruction: the request in the prompt of decoding and of teacher forcing; the processor's own default
    (GLM-ASR's) otherwise; refused by a model without a chat prompt, and empty."""
    from conftest import make_corpus, run_comflp, save_plain, tiny_model

    from comflp.data import collate, read_corpus_dir
    from comflp.heads import chat_prompt, prompt_inputs, teacher_forced_inputs
    from comflp.model import load_model
    from comflp.prompt import Prompt

    loaded = load_model(qwen2_audio_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    batch = collate(read_corpus_dir(make_corpus(tmp_path / "corpus", n=2)), loaded.feature_extractor)
    asked = Prompt(instruction="Write what is said.")
    assert "Write what is said." in chat_prompt(loaded.model, loaded.tokenizer, asked)
    assert "Transcribe the audio." in chat_prompt(loaded.model, loaded.tokenizer)
    text = loaded.tokenizer.tokenizer
    for ids in (prompt_inputs(loaded.model, loaded.tokenizer, batch, asked)["input_ids"],
                teacher_forced_inputs(loaded.model, loaded.tokenizer, batch, asked)[0]["input_ids"]):
        assert "Write what is said." in text.decode(ids[0])
    glm = load_model(speech_llm_dir(tmp_path, "glmasr"), allow_encoder_decoder=True, need_tokenizer=True)
    assert "Please transcribe this audio into text" in chat_prompt(glm.model, glm.tokenizer)
    corpus = tmp_path / "corpus"
    ctc = save_plain(tiny_model("wav2vec2"), tmp_path / "ctc", tmp_path / "proc")
    for model, flag, message in ((ctc, "Write it.", "this wav2vec2 model has none"),
                                 (tmp_path / "qwen2_audio", " ", "--instruction is empty")):
        result = run_comflp("test", "--model", str(model), "--data_dir", str(corpus), "--instruction", flag,
                            "--output_dir", str(tmp_path / "t"))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = run_comflp("test", "--model", str(tmp_path / "qwen2_audio"), "--data_dir", str(corpus),
                        "--instruction", "Write what is said.", "--output_dir", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr


def test_demo_speech_llm_start_has_the_demo_whispers_encoder_as_its_tower(tmp_path: Path) -> None:
    """`python -m comflp.demo speechllm-init`: Qwen2-Audio's architecture, the audio tower the Whisper's encoder
    weight for weight, the processor's prompt around the audio, the corpus's characters spelled without an
    unknown token; it decodes (untrained) through comflp."""
    import argparse

    from safetensors.torch import load_file

    from comflp.data import collate, read_corpus_dir
    from comflp.demo.recipes import speechllm_init
    from comflp.heads import decode_batch
    from comflp.model import load_model
    from comflp.paths import DEMO_WHISPER_DIR, demo_split

    out = speechllm_init(argparse.Namespace(whisper=DEMO_WHISPER_DIR, output=tmp_path / "init", llm_layers=4,
                                            d_model=192, seed=0, overwrite=False))
    loaded = load_model(out, allow_encoder_decoder=True, need_tokenizer=True)
    assert type(loaded.model).__name__ == "Qwen2AudioForConditionalGeneration"
    whisper = load_file(str(DEMO_WHISPER_DIR / "model.safetensors"))
    tower = loaded.model.model.audio_tower.state_dict()
    assert all(torch.equal(tower[k.removeprefix("model.encoder.")], v.float())
               for k, v in whisper.items() if k.startswith("model.encoder."))
    utts = read_corpus_dir(demo_split("train"))[:3]
    tokenizer = loaded.tokenizer.tokenizer
    for u in utts:
        ids = tokenizer(u.text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == u.text
    texts = decode_batch(loaded.model, loaded.tokenizer, collate(utts, loaded.feature_extractor), max_new_tokens=4)
    assert len(texts) == 3


def test_a_speech_llm_without_its_processor_or_with_a_broken_template_is_named_in_one_line(tmp_path: Path) -> None:
    from conftest import make_corpus, run_comflp

    corpus = make_corpus(tmp_path / "corpus", n=3)
    tiny_speech_llm("qwen2_audio").save_pretrained(tmp_path / "bare")
    # Granite's extractor needs torchaudio (its default, built for a model saved without one, too)
    tiny_speech_llm("granite_speech").save_pretrained(tmp_path / "granite")
    broken = qwen2_audio_dir(tmp_path)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] ", encoding="utf-8")
    corrupt = speech_llm_dir(tmp_path, "voxtral")
    (corrupt / "tekken.json").write_text('{"config": {', encoding="utf-8")  # a truncated tokenizer file
    for model, message in ((tmp_path / "bare", "has no processor"), (tmp_path / "granite", "has no processor"),
                           (broken, "chat template cannot render an audio turn (TemplateSyntaxError"),
                           (corrupt, "cannot load its processor (JSONDecodeError")):
        result = run_comflp("test", "--model", str(model), "--data_dir", str(corpus),
                            "--output_dir", str(tmp_path / "t"))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "t" / "test_asr.json").exists()  # no report (the template fails at decoding)


def test_a_processor_needing_a_missing_library_is_named_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """Voxtral's tokenizer needs mistral_common: without it, decoding ends in one line naming the library and
    the extra that installs it, not an ImportError traceback."""
    import transformers
    from conftest import make_corpus, run_comflp

    model_dir, corpus = speech_llm_dir(tmp_path, "voxtral"), make_corpus(tmp_path / "corpus", n=2)

    def missing(*args, **kwargs):
        raise ImportError("MistralCommonBackend requires the mistral-common library but it was not found in your "
                          "environment.\nYou can install it with pip.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert "requires the mistral-common library" in last and "comflp[voxtral]" in last, result.stderr
    assert not (tmp_path / "t").exists()


def test_qwen3_asr_is_prompted_by_its_own_request_and_language(tmp_path: Path) -> None:
    """Qwen3-ASR: the processor's own transcription request (the audio alone in the user's turn); --language
    prefills the answer with its tag, in decoding (== plain transformers' apply_transcription_request with that
    language) and in teacher forcing (the transcript right after the tag). --instruction is refused for it,
    --language for a chat-template family, each in one line."""
    from conftest import make_corpus, run_comflp

    from comflp.data import collate, read_corpus_dir
    from comflp.heads import head_of, teacher_forced_inputs
    from comflp.model import load_model
    from comflp.prompt import Prompt

    model_dir, corpus = speech_llm_dir(tmp_path, "qwen3_asr"), make_corpus(tmp_path / "corpus", n=4)
    loaded = load_model(model_dir, allow_encoder_decoder=True, need_tokenizer=True)
    model, processor = loaded.model, loaded.tokenizer
    result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", "3",
                        "--language", "zh", "--output_dir", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    utts = read_corpus_dir(corpus)
    limit = head_of(model).generation_limit(model, processor, [u.text for u in utts])
    got = dict(line.partition(" ")[::2] for line in (tmp_path / "t" / "hyp.txt").read_text(encoding="utf-8").splitlines())
    assert [got[u.utt_id].strip() for u in utts] == _alone(model, processor, utts, limit, language="zh")
    inputs, transcript, _ = teacher_forced_inputs(model, processor, collate(utts[:1], loaded.feature_extractor),
                                                  Prompt(language="zh"))
    start = int(transcript[0].nonzero()[0])
    tag = processor.tokenizer("language Chinese<asr_text>", add_special_tokens=False).input_ids
    assert inputs["input_ids"][0, start - len(tag): start].tolist() == tag
    assert "Transcribe" not in processor.tokenizer.decode(inputs["input_ids"][0, :start])  # the audio alone
    for argv, message in ((["--model", str(model_dir), "--instruction", "Write it down."], "leave --instruction out"),
                          (["--model", str(qwen2_audio_dir(tmp_path)), "--language", "zh"], "leave them out"),
                          (["--model", str(model_dir), "--language", "xx"], "--language xx")):
        result = run_comflp("test", *argv, "--data_dir", str(corpus), "--output_dir", str(tmp_path / "bad"))
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr


def test_voxtral_is_prompted_by_its_transcription_mode_unless_asked_in_a_chat_turn(tmp_path: Path) -> None:
    """Voxtral: its processor's transcription request (`lang:xx[TRANSCRIBE]` with --language), == plain
    transformers' apply_transcription_request; --instruction asks in a chat turn instead (== its chat
    template); both at once are refused in one line."""
    from conftest import make_corpus, run_comflp

    from comflp.data import collate, read_corpus_dir
    from comflp.heads import head_of, teacher_forced_inputs
    from comflp.model import load_model
    from comflp.prompt import Prompt

    model_dir, corpus = speech_llm_dir(tmp_path, "voxtral"), make_corpus(tmp_path / "corpus", n=4)
    loaded = load_model(model_dir, allow_encoder_decoder=True, need_tokenizer=True)
    model, processor = loaded.model, loaded.tokenizer
    utts = read_corpus_dir(corpus)
    limit = head_of(model).generation_limit(model, processor, [u.text for u in utts])
    for flags, request, language in ((["--language", "en"], "Transcribe the audio.", "en"),
                                     (["--instruction", "Write down what is said."], "Write down what is said.", None)):
        out = tmp_path / flags[0].strip("-")
        result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", "3",
                            *flags, "--output_dir", str(out))
        assert result.returncode == 0, result.stderr
        got = dict(line.partition(" ")[::2] for line in (out / "hyp.txt").read_text(encoding="utf-8").splitlines())
        expected = []
        for u in utts:
            inputs = alone_inputs(model, processor, u.path, request, language)
            ids = model.generate(**inputs, max_new_tokens=limit, do_sample=False, num_beams=1)
            expected.append(" ".join(_decoded(model, processor, ids[:, inputs["input_ids"].shape[1]:])[0].split()))
        assert [got[u.utt_id].strip() for u in utts] == expected
    inputs, transcript, _ = teacher_forced_inputs(model, processor, collate(utts[:1], loaded.feature_extractor),
                                                  Prompt(language="en"))
    start = int(transcript[0].nonzero()[0])
    tail = processor.tokenizer.decode(inputs["input_ids"][0, :start].tolist()[-10:])
    assert "lang:en" in tail and tail.endswith("[TRANSCRIBE]"), tail
    result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(corpus), "--language", "en",
                        "--instruction", "Write it.", "--output_dir", str(tmp_path / "both"))
    assert result.returncode == 2 and "takes no --language" in result.stderr.strip().splitlines()[-1], result.stderr
