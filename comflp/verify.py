"""Fine search: the real error rate of candidate strategies on a small labelled subset.

The subset is the first ``num_batches x batch_size`` utterances of the corpus
in ``wav.scp`` order (the paper's unshuffled loader), decoded in length-sorted
batches of ``batch_size``.

No pruned model is built and no weight is copied: the original model runs with
layers switched off (its layer list replaced by the kept modules). Candidates
share computation: each batch's feature-encoder output is computed once, and
the output of every layer application is cached under the kept-layer prefix
that produced it, so candidates whose kept sequences share a prefix (a trie
over kept sequences) reuse it. Candidates are visited in lexicographic order
of their kept sequences and the cache holds only the current trie path, so
memory stays at one path of hidden states per batch. The logits are those of
the separately built pruned model, bit for bit.

GLP (greedy layer pruning, the paper's slow baseline) removes one layer per
step, each time the one whose removal gives the lowest error rate, on the
same engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import AudioBatch, Utterance, collate, iter_batches, length_sorted_batches
from .decode import check_decodable
from .heads import decode_batch, head_of
from .errors import ComflpError
from .prompt import Prompt, detect_languages
from .metrics import ErrorRate, Unit, error_rate, guess_unit, rate_name, utterance_errors
from .model import LoadedModel, num_layers, padding_exact, prune, run_layers
from .model.families import base_model, family_of, get_module, set_module, stack_of
from .model.layers import layers_slot
from .repair import Repair, applied as repair_applied, cuts_of
from .strategy import Candidate, check_prune_count, validate

log = logging.getLogger(__name__)


def verify_subset(utts: Sequence[Utterance], num_batches: int, batch_size: int) -> list[Utterance]:
    """The first ``num_batches x batch_size`` utterances in corpus order (all if fewer)."""
    if num_batches < 1 or batch_size < 1:
        raise ComflpError("--test_num_batch and --verify_batch_size must be positive")
    return list(utts[: num_batches * batch_size])


# The fine search's caches: what several candidates share on one batch is computed once.

class _CachedLayer(nn.Module):
    """Runs ``layer`` unless its output for this kept-layer prefix is cached."""

    def __init__(self, layer: nn.Module, key: tuple[int, ...], cache: dict, counter: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.key = key
        self.cache = cache
        self.counter = counter

    def forward(self, *args, **kwargs):
        out = self.cache.get(self.key)
        if out is None:
            out = self.layer(*args, **kwargs)
            self.cache[self.key] = out
            self.counter[0] += 1
        return out


@contextlib.contextmanager
def run_layers_cached(model: nn.Module, kept: Sequence[int], cache: dict, counter: list[int],
                      stack: str = "encoder", *, successor_in_key: bool = False) -> Iterator[nn.Module]:
    """:func:`run_layers`, with the output of each layer application cached under its kept-layer prefix.

    ``cache`` maps a prefix ``kept[: j + 1]`` to the output of layer ``kept[j]`` after that prefix; a
    forward finds the outputs of a prefix it shares with an earlier forward there instead of running
    those layers again (valid while the input batch is the same). ``counter[0]`` counts the layer
    applications actually run. ``successor_in_key``: a layer's output also depends on the layer kept after
    it (a repair map folded at a cut, :mod:`comflp.repair`), so the key is the prefix and that layer (-1 for
    none).
    """
    kept = tuple(kept)

    def key(j: int) -> tuple[int, ...]:
        if not successor_in_key:
            return kept[: j + 1]
        return kept[: j + 1] + (kept[j + 1] if j + 1 < len(kept) else -1,)

    with run_layers(model, kept, stack):
        parent, name = layers_slot(model, stack)
        selected = getattr(parent, name)
        setattr(parent, name, nn.ModuleList(
            [_CachedLayer(layer, key(j), cache, counter) for j, layer in enumerate(selected)]))
        try:
            yield model
        finally:
            setattr(parent, name, selected)


class _OutputOnce(nn.Module):
    """Stands in for a module before the layers: runs it unless ``outputs`` holds its output under ``key``."""

    def __init__(self, module: nn.Module, outputs: dict, key: str) -> None:
        super().__init__()
        self.module = module
        self.outputs = outputs
        self.key = key

    def __getattr__(self, name: str):
        # what the model reads off the module it wraps (Whisper's encoder reads ``conv1.stride``) is the module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def forward(self, *args, **kwargs):
        if self.key not in self.outputs:
            self.outputs[self.key] = self.module(*args, **kwargs)
        return self.outputs[self.key]


@contextlib.contextmanager
def frozen_features(model: nn.Module, outputs: dict | None = None) -> Iterator[nn.Module]:
    """Within the block, the front end and the family's ``per_batch`` modules run once: every forward after
    the first reuses their outputs.

    Valid while every forward in the block gets the same input batch (fine search decodes one batch under
    many layer sets): what runs before the first layer is then the same for every layer set.
    ``outputs``: module path -> output, kept by the caller to reuse them in a later block on the same batch
    (filled in by the first forward).
    """
    base = base_model(model)
    family = family_of(model)
    outputs = {} if outputs is None else outputs
    originals = {}
    for path in (family.feature_encoder, *family.per_batch):
        if (module := get_module(base, path)) is not None:
            originals[path] = module
            set_module(base, path, _OutputOnce(module, outputs, path))
    try:
        yield model
    finally:
        for path, module in originals.items():
            set_module(base, path, module)


@dataclass
class FineSearchStats:
    """Work done: layer forward calls made, and what building each candidate separately would make."""

    layer_applications: int = 0
    naive_layer_applications: int = 0
    utterance_decodes: int = 0  # (candidate, utterance) pairs decoded
    seconds: float = 0.0


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in a module output (a tensor, or tuples, lists, dicts and model outputs of them).

    Written here because torch's tree flattening (``torch.utils._pytree``) is a private API.
    """
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # transformers' ModelOutput is a dict
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


@dataclass
class FineSearch:
    """Evaluate many pruning strategies of one model on one labelled subset.

    ``stack``: the layer stack the strategies prune. An encoder-decoder model (Whisper) is decoded by
    greedy generation with the cache; its references and hypotheses in words go through Whisper's basic
    text normaliser (characters are scored as they are). Encoder strategies share the kept-layer prefixes
    as for CTC; decoder strategies share the batch's encoder output.
    ``front_end_cache_gb``: memory for keeping each batch's front-end outputs (the modules before the first
    layer) from one evaluation to the next, as GLP's steps and a measure report evaluate again and again;
    batches past it recompute theirs. 0 keeps none. The kept outputs belong to the model's weights at the
    time: an engine is for one frozen model (build a new one after changing its weights).
    """

    loaded: LoadedModel
    utts: Sequence[Utterance]
    batch_size: int = 32
    unit: Unit | None = None
    progress: bool = True
    pad_audio: bool = False
    stack: str = "encoder"
    front_end_cache_gb: float = 2.0
    stats: FineSearchStats = field(default_factory=FineSearchStats)
    languages: dict[str, str] = field(default_factory=dict)  # utterance -> language token detected (multilingual)
    prompt: Prompt | None = None  # an encoder-decoder model's language and task (comflp.prompt)
    repair: Repair | None = None  # every candidate is evaluated after the repair of its cuts (comflp.repair)

    def __post_init__(self) -> None:
        if self.loaded.tokenizer is None:
            raise ComflpError(f"{self.loaded.source} has no tokenizer: fine search needs one to decode")
        if any(u.text is None for u in self.utts):
            raise ComflpError("fine search needs transcripts (a text file in the verify data dir)")
        self.unit = self.unit or guess_unit([u.text for u in self.utts])
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        check_decodable(model, self.loaded.feature_extractor, self.utts)
        self.head = head_of(model)
        self.prompt = self.head.check_prompt(model, self.prompt)
        self._normalizer = self.head.normalizer(model, tokenizer, self.prompt)
        references = [u.text for u in self.utts]
        self.head.check_references(references, tokenizer, what="fine-search references")
        # the same cap for every batch, from the whole subset's references (None: the head does not generate)
        self.max_new_tokens = self.head.generation_limit(model, tokenizer, references)
        self.utts = [replace(u, text=self.normalize(u.text)) for u in self.utts]
        self.device = next(model.parameters()).device
        groups = length_sorted_batches(self.utts, batch_size=self.batch_size)
        self._batches: list[AudioBatch] = [collate(g, self.loaded.feature_extractor) for g in groups]
        self.num_layers = num_layers(model, self.stack)
        self._cacheable = stack_of(model, self.stack).cacheable
        self._front_ends: dict[int, dict] = {}  # batch index -> front-end outputs kept (frozen_features)
        self._front_end_bytes = 0
        self._languages: dict[int, list[str] | None] = {}  # batch index -> languages the full model detected

    def normalize(self, text: str) -> str:
        """Text in words through the head kind's normaliser (:meth:`comflp.heads.HeadKind.normalizer`: Whisper's
        English or basic one for generated text); characters, and a head without one, as they are."""
        return self._normalizer(text) if self._normalizer is not None and self.unit == "word" else text

    def _batch_languages(self, batch: AudioBatch, index: int) -> list[str] | None:
        """The prompt languages the full model detects for batch ``index`` (None when the prompt needs none),
        detected once: every candidate's prompt."""
        if index not in self._languages:
            self._languages[index] = detect_languages(self.loaded.model, batch, self.prompt)
            if self._languages[index] is not None:
                self.languages.update(zip(batch.utt_ids, self._languages[index]))
        return self._languages[index]

    def _repaired(self, kept: Sequence[int]) -> contextlib.AbstractContextManager:
        """The repair maps of the kept sequence's cuts applied to the model (nothing without a repair); one line
        when the repair has no map for one of them."""
        if self.repair is None:
            return contextlib.nullcontext()
        cuts = cuts_of([i + 1 for i in range(self.num_layers) if i not in set(kept)], self.num_layers, self.stack)
        maps = {m.cut: m for m in self.repair.maps}
        known = set(maps) | {s.cut for s in self.repair.skipped}
        if missing := [c for c in cuts if c not in known]:
            raise ComflpError(f"no repair was fitted for the {self.stack} block {list(missing[0].block)}")
        return repair_applied(self.loaded.model, [maps[c] for c in cuts if c in maps])

    def _switched(self, seq: tuple[int, ...], cache: dict, counter: list[int]) -> contextlib.AbstractContextManager:
        """The model running the kept sequence ``seq`` of the stack (repaired first, when the search repairs).

        A stack that runs once per forward has its layer outputs cached along the trie path; one that runs once
        per generated token (a decoder) cannot, and counts its layers as applied once per candidate."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._repaired(seq))  # on the full model's modules, before the layer list changes
        if self._cacheable:
            stack.enter_context(run_layers_cached(self.loaded.model, seq, cache, counter, self.stack,
                                                  successor_in_key=self.repair is not None))
        else:
            stack.enter_context(run_layers(self.loaded.model, seq, self.stack))
            counter[0] += len(seq)
        return stack

    def _keep_front_end(self, index: int, outputs: dict) -> None:
        """Keep batch ``index``'s front-end outputs for later evaluations while they fit the budget."""
        size = sum(t.numel() * t.element_size() for t in _tensors(outputs))
        if self._front_end_bytes + size <= self.front_end_cache_gb * 2**30:
            self._front_ends[index] = outputs
            self._front_end_bytes += size

    def _decode_batch(self, batch: AudioBatch, index: int, kept: list[tuple[int, ...]], order: list[int],
                      hyps: list[dict[str, str]], counter: list[int], bar: tqdm) -> None:
        """Decode one batch under every kept sequence, walking the trie of kept sequences in DFS order.

        What comes before the stack runs once per batch: the front end (kept between evaluations,
        :func:`frozen_features`), the full model's detected languages, and the head kind's shared prefix (a
        decoder's candidates share the encoder's outputs)."""
        model = self.loaded.model
        languages = self._batch_languages(batch, index)
        cache: dict[tuple[int, ...], object] = {}
        outputs = self._front_ends.get(index, {})
        exact = (contextlib.nullcontext() if self.pad_audio
                 else padding_exact(model, batch.attention_mask.sum(-1).tolist()))
        with exact, frozen_features(model, outputs):
            shared = self.head.shared_prefix(model, self.loaded.tokenizer, batch, self.stack, self.prompt)
            for i in order:
                seq = kept[i]
                for key in [k for k in cache if seq[: len(k)] != k]:
                    del cache[key]  # leave the trie path
                with self._switched(seq, cache, counter):
                    texts = self.head.decode(model, self.loaded.tokenizer, batch, max_new_tokens=self.max_new_tokens,
                                             prompt=self.prompt, languages=languages, **shared)
                hyps[i].update(zip(batch.utt_ids, (self.normalize(t) for t in texts)))
                bar.update(1)
        if index not in self._front_ends:
            self._keep_front_end(index, outputs)

    def _decode(self, pruned_sets: Sequence[Sequence[int]], indices: Sequence[int]) -> list[dict[str, str]]:
        """Hypotheses of each pruned set (1-based layers) on the utterances of the batches ``indices``, keyed by
        utterance id."""
        batches = [self._batches[i] for i in indices]
        sets = [validate(p, self.num_layers) if p else [] for p in pruned_sets]
        kept = [tuple(i for i in range(self.num_layers) if i + 1 not in set(p)) for p in sets]
        order = sorted(range(len(sets)), key=lambda i: kept[i])  # DFS order of the trie
        hyps: list[dict[str, str]] = [{} for _ in sets]
        start = time.perf_counter()
        counter = [0]
        bar = tqdm(total=len(batches) * len(sets), desc="fine search", unit="cand-batch", disable=not self.progress)
        with torch.inference_mode():
            for index, batch in zip(indices, batches):
                self._decode_batch(batch.to(self.device), index, kept, order, hyps, counter, bar)
        bar.close()
        self.stats.layer_applications += counter[0]
        self.stats.naive_layer_applications += len(batches) * sum(len(k) for k in kept)
        self.stats.utterance_decodes += len(sets) * sum(len(b.utt_ids) for b in batches)
        self.stats.seconds += time.perf_counter() - start
        return hyps

    @property
    def batches(self) -> list[AudioBatch]:
        """The subset's length-sorted batches, in the order :meth:`evaluate` decodes them."""
        return self._batches

    def decode_batches(self, pruned_sets: Sequence[Sequence[int]], indices: Sequence[int]) -> list[dict[str, str]]:
        """Hypotheses of each pruned set on the batches ``indices`` of :attr:`batches`, keyed by utterance id."""
        return self._decode(pruned_sets, indices)

    def transcribe(self, pruned_sets: Sequence[Sequence[int]]) -> list[list[str]]:
        """Hypotheses of each pruned set (1-based layers) on the whole subset, in ``utts`` order (normalised as
        they are scored)."""
        hyps = self._decode(pruned_sets, range(len(self._batches)))
        return [[h[u.utt_id] for u in self.utts] for h in hyps]

    def error_rates(self, hypotheses: Sequence[Sequence[str]]) -> list[ErrorRate]:
        """The error rate of each set of hypotheses (from :meth:`transcribe`) against the subset."""
        refs = [u.text for u in self.utts]
        return [error_rate(refs, list(h), unit=self.unit) for h in hypotheses]

    def evaluate(self, pruned_sets: Sequence[Sequence[int]]) -> list[ErrorRate]:
        """Error rate of each pruned set (1-based layers) on the whole subset, in the order given."""
        return self.error_rates(self.transcribe(pruned_sets))


def evaluate_separately(loaded: LoadedModel, utts: Sequence[Utterance], pruned_sets: Sequence[Sequence[int]], *,
                        batch_size: int = 32, unit: Unit | None = None, pad_audio: bool = False) -> tuple[list[ErrorRate], list[list[str]]]:
    """The naive reference: build each pruned model (weights copied) and decode the subset with it.

    Returns the error rates and the hypotheses (in ``utts`` order) of each set.
    """
    unit = unit or guess_unit([u.text for u in utts])
    out, all_hyps = [], []
    for pruned in pruned_sets:
        model = prune(loaded.model, pruned) if pruned else loaded.model
        hyps: dict[str, str] = {}
        with torch.inference_mode():
            for batch in iter_batches(utts, loaded.feature_extractor, batch_size=batch_size):
                batch = batch.to(next(model.parameters()).device)
                hyps.update(zip(batch.utt_ids, decode_batch(model, loaded.tokenizer, batch, pad_audio=pad_audio)))
        all_hyps.append([hyps[u.utt_id] for u in utts])
        out.append(error_rate([u.text for u in utts], all_hyps[-1], unit=unit))
    return out, all_hyps


@dataclass(frozen=True)
class VerifyReport:
    """Candidates with their error rates (input order), the best one, and score-vs-CER correlation.

    ``decoded[i]`` is the number of subset utterances candidate i was decoded on: the whole subset, or
    fewer when a race dropped it (its ``cer`` is then the rate on those utterances).
    """

    candidates: list[Candidate]
    best: Candidate
    pearson: float | None
    decoded: list[int]


def _pearson(candidates: Sequence[Candidate]) -> float | None:
    scores = [c.score for c in candidates]
    cers = [c.cer for c in candidates]
    if len(candidates) > 2 and None not in scores and np.std(scores) > 0 and np.std(cers) > 0:
        return float(np.corrcoef(scores, cers)[0, 1])
    return None


def verify(fine: FineSearch, candidates: Sequence[Candidate]) -> VerifyReport:
    """Measure every candidate on the whole subset; the best is the lowest error rate (ties: the earlier candidate)."""
    rates = fine.evaluate([c.pruned for c in candidates])
    measured = [Candidate(list(c.pruned), c.score, r.rate) for c, r in zip(candidates, rates)]
    best = min(measured, key=lambda c: c.cer)
    return VerifyReport(measured, best, _pearson(measured), [len(fine.utts)] * len(measured))


RACE_CONFIDENCE = 0.99
RACE_RESAMPLES = 2000


def race_schedule(total: int, first: int) -> list[int]:
    """Cumulative counts (of batches) after each racing round: ``first``, doubling, then all.

    >>> race_schedule(200, 32)
    [32, 64, 128, 200]
    >>> race_schedule(20, 32)
    [20]
    """
    ends, m = [], first
    while m < total:
        ends.append(m)
        m *= 2
    return ends + [total]


def worse_than_leader(errors: np.ndarray, leader_errors: np.ndarray, tokens: np.ndarray, *, confidence: float,
                      resamples: int, rng: np.random.Generator) -> bool:
    """Whether a candidate's error rate exceeds the leader's with one-sided ``confidence`` (paired bootstrap).

    errors, leader_errors, tokens: [m] edit counts of the candidate and of the leader, and reference tokens,
    on the same m utterances. The rate difference is
    Delta = (sum e - sum e_leader) / sum n; it is recomputed on ``resamples`` resamples of the m utterances
    drawn with replacement (the same utterances for both: a paired bootstrap), and the candidate is worse
    when the (1 - confidence) quantile of those Deltas is above 0. Identical error counts are never worse.
    """
    m = len(tokens)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=resamples)  # [B, m] times each utterance is drawn
    diff = counts @ (errors - leader_errors)
    total = np.maximum(counts @ tokens, 1)
    return bool(np.quantile(diff / total, 1.0 - confidence) > 0)


def race(fine: FineSearch, candidates: Sequence[Candidate], *, confidence: float = RACE_CONFIDENCE,
         first_batches: int | None = None, resamples: int = RACE_RESAMPLES, seed: int = 0) -> VerifyReport:
    """Racing fine search: the candidates of :func:`verify`, decoding the losers on fewer utterances.

    The subset's length-sorted batches (those :func:`verify` decodes) are taken in a seeded random order,
    in growing rounds (:func:`race_schedule` over batches; the first round is ``first_batches``, default
    1/8 of the batches, at least one). Whole batches keep the padding, and so the work per utterance, of
    full evaluation: a race is never slower than :func:`verify` by more than its bookkeeping.
    After each round the leader is the candidate with the lowest error rate on the utterances decoded so
    far (ties: the earlier candidate), and every candidate that is worse than the leader by
    :func:`worse_than_leader` is dropped. The survivors are decoded on the whole subset, so the best is
    the lowest full-subset error rate among them, as :func:`verify` would find unless the true best was
    dropped by chance (probability about 1 - confidence per comparison).
    """
    if not 0.5 <= confidence < 1:
        raise ComflpError(f"race confidence {confidence} must be in [0.5, 1)")
    batches = fine.batches
    first = first_batches or -(-len(batches) // 8)
    if first < 1:
        raise ComflpError(f"race first round of {first} batches must be positive")
    order = [int(b) for b in np.random.default_rng(seed).permutation(len(batches))]
    refs = {u.utt_id: u.text for u in fine.utts}
    n = len(fine.utts)
    alive = list(range(len(candidates)))
    errors = [np.zeros(0, dtype=np.int64) for _ in candidates]
    tokens = np.zeros(0, dtype=np.int64)
    decoded = [0] * len(candidates)
    done = seen = 0
    rng = np.random.default_rng([seed, 1])
    for rnd, end in enumerate(race_schedule(len(batches), first), 1):
        ids = [utt for b in order[done:end] for utt in batches[b].utt_ids]
        hyps = fine.decode_batches([candidates[i].pruned for i in alive], order[done:end])
        seen += len(ids)
        for i, h in zip(alive, hyps):
            e, t = utterance_errors([refs[u] for u in ids], [h[u] for u in ids], unit=fine.unit)
            errors[i] = np.concatenate([errors[i], e])
            decoded[i] = seen
        tokens = np.concatenate([tokens, t])
        done = end
        rates = {i: errors[i].sum() / max(tokens.sum(), 1) for i in alive}
        leader = min(alive, key=lambda i: (rates[i], i))
        dropped = [] if end == len(batches) else [
            i for i in alive if i != leader and worse_than_leader(
                errors[i], errors[leader], tokens, confidence=confidence, resamples=resamples, rng=rng)]
        alive = [i for i in alive if i not in dropped]
        log.info("race round %d: %d/%d utterances, leader %s at %.2f%%, dropped %d, %d left", rnd, seen, n,
                 [list(b) for b in candidates[leader].blocks], 100 * rates[leader], len(dropped), len(alive))
    measured = [Candidate(list(c.pruned), c.score, float(errors[i].sum() / max(tokens[:decoded[i]].sum(), 1)))
                for i, c in enumerate(candidates)]
    best = measured[min(alive, key=lambda i: (measured[i].cer, i))]
    return VerifyReport(measured, best, _pearson([measured[i] for i in alive]), decoded)


@dataclass(frozen=True)
class GLPResult:
    """Greedy layer pruning: the set after each step with its error rate (fewer than K steps if stopped early)."""

    path: list[Candidate]
    seconds: float
    evaluations: int


def glp_evaluations(num_layers: int, k: int) -> int:
    """Candidate evaluations of a full GLP run: L + (L - 1) + ... + (L - K + 1).

    >>> glp_evaluations(12, 6), glp_evaluations(24, 12)
    (57, 222)
    """
    return k * num_layers - k * (k - 1) // 2


def greedy_layer_pruning(fine: FineSearch, k: int, *, progress: bool = True,
                         max_seconds: float | None = None) -> GLPResult:
    """The paper's baseline: K steps, each removing the layer whose removal gives the lowest error rate.

    ``max_seconds`` stops after the first step that ends past that time (for benchmarks that extrapolate).
    """
    check_prune_count(fine.num_layers, k)
    start = time.perf_counter()
    pruned: list[int] = []
    path: list[Candidate] = []
    evaluations = 0
    for step in range(1, k + 1):
        remaining = [x for x in range(1, fine.num_layers + 1) if x not in pruned]
        trials = [sorted(pruned + [x]) for x in remaining]
        rates = fine.evaluate(trials)
        evaluations += len(trials)
        best = int(np.argmin([r.rate for r in rates]))  # ties: the lowest layer
        pruned = trials[best]
        path.append(Candidate(pruned, None, rates[best].rate))
        log.info("GLP step %d: prune %s -> %s %.2f%%", step, pruned, rate_name(fine.unit), 100 * rates[best].rate)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return GLPResult(path, time.perf_counter() - start, evaluations)
