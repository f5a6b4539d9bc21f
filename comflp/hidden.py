"""Capture every layer's hidden states and accumulate the statistics the measures need.

Hidden state 0 is the input of layer 1, hidden state l the output of layer l
(l = 1..L), captured with forward hooks on the layer modules: this is the same
as ``output_hidden_states`` for post-norm encoders, and for stable-layer-norm
encoders it gives state L *before* the encoder's final LayerNorm (what layer
L+1 would see), whatever the transformers version does with that last entry.

One forward pass per batch feeds all measures:

- per-batch measures (``dc``, ``dc_unbiased``, ``cka_unbiased``) on pooled
  utterance vectors of each (accumulated) batch, averaged over batches, as the
  paper's DC;
- streamed measures (``svcca``, ``pwcca``, ``cka``) from the running sum and
  second moment of all layers' features side by side, so mode T can use every
  frame of thousands of utterances at fixed memory: the upper triangle of the
  [F, F] float64 moment with F = (L+1) x D, or, when that exceeds
  ``moment_memory_gb``, one band of layers' rows per pass over the same
  utterances (:func:`plan_bands`), each band's pairs reduced to values as
  soon as it is complete;
- ``cosine`` and ``angular`` from running per-pair sums.

Samples for streamed and cosine measures are utterances (mode ``U``, pooled)
or frames (mode ``T``). Pooling ignores padded frames; ``pool_padding=True``
reproduces the paper, which averaged zero-padded frames in. Every utterance's
hidden states are those it has alone (:func:`comflp.model.forward`), so the
matrices depend on which utterances form a batch only through the per-batch
measures' definition; ``pad_audio=True`` is the paper's padded batching.

Sharding over processes goes through accelerate: process r takes batches
r, r + W, r + 2W, ...; sums are all-reduced, so W processes give the
single-process matrices (up to float64 summation order).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from . import measures as M
from .data import Utterance, collate, num_samples
from .vocab import check_known_tokens
from .errors import ComflpError
from .heads import check_prompt, head_of, require
from .prompt import Prompt, detect_languages, prefix_ids
from .model import forward, layer_frame_mask, min_audio_samples, stack_layers

log = logging.getLogger(__name__)

PER_BATCH = ("dc", "dc_unbiased", "cka_unbiased")
STREAMED = ("svcca", "pwcca", "cka")
PER_SAMPLE = ("cosine", "angular")
ALL_MEASURES = PER_BATCH + STREAMED + PER_SAMPLE


@contextlib.contextmanager
def capture_layer_states(model, stack: str = "encoder") -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward fills the yielded list with L+1 tensors [B, T, D] of layer stack ``stack``."""
    layers = stack_layers(model, stack)
    states: list[torch.Tensor] = []

    def grab_input(module, args, kwargs):
        states.clear()
        states.append(args[0] if args else kwargs["hidden_states"])

    def grab_output(module, args, kwargs, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(grab_output, with_kwargs=True) for layer in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def forward_stack(model, batch, states: Sequence[torch.Tensor], stack: str = "encoder", *, tokenizer=None,
                  prompt: Prompt | None = None, pad_audio: bool = False, with_prompt: bool = False) -> torch.Tensor:
    """Forward ``batch`` (states captured by :func:`capture_layer_states` fill ``states``); the [B, T] bool mask
    of the real positions of ``stack``: the real frames the encoder's layers see, or, for a decoder (teacher
    forcing on the batch's transcripts, ``prompt`` checked by :func:`comflp.prompt.check_prompt`), the tokens
    that predict the transcript (``with_prompt``: those that predict the prompt's own tokens too)."""
    own = head_of(model).forward_stack(model, tokenizer, batch, states, stack, with_prompt=with_prompt, prompt=prompt)
    if own is not None:  # a head kind whose inputs are more than the audio (a speech-LLM's prompt)
        return own
    if stack == "encoder":
        forward(model, batch.inputs, batch.attention_mask, pad_audio=pad_audio)
        return layer_frame_mask(model, batch.attention_mask, states[0].shape[1])
    languages = detect_languages(model, batch, prompt)  # by the measured (full) model, if the prompt needs
    labels = head_of(model).labels(model, tokenizer, batch.texts, prompt=prompt,
                                   languages=languages).to(batch.inputs.device)
    forward(model, batch.inputs, batch.attention_mask, pad_audio=pad_audio, labels=labels)
    # decoder input i = start token, then label i - 1: real where label i is; the positions that predict the
    # prompt's own tokens (language, task) are left out, so the states pooled are those that spell the text
    mask = labels != -100
    if not with_prompt:
        mask[:, : len(prefix_ids(model, prompt, languages[0] if languages else None)) - 1] = False
    return mask


def pool(states: Sequence[torch.Tensor], mask: torch.Tensor, *, pool_padding: bool = False) -> torch.Tensor:
    """Mean over time of each layer's states: L x [B, T, D], mask [B, T] -> [L, B, D] float64.

    The weighted sum runs as a batched matrix product in the states' own dtype
    (the precision the model computed them in), then widens to float64.
    """
    if pool_padding:
        weights = torch.full(mask.shape, 1.0 / mask.shape[1], dtype=states[0].dtype, device=mask.device)
    else:
        m = mask.to(states[0].dtype)
        weights = m / m.sum(1, keepdim=True).clamp(min=1.0)
    w = weights[:, None, :]  # [B, 1, T]
    return torch.stack([torch.bmm(w, s).squeeze(1) for s in states]).to(torch.float64)


def flatten_sequences(states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """DC mode 'seq': each utterance as its frame sequence, cut to the batch's shortest, flattened.

    L x [B, T, D] -> [L, B, T_min * D].
    """
    t_min = int(mask.sum(-1).min())
    return torch.stack([s[:, :t_min].reshape(s.shape[0], -1).to(torch.float64) for s in states])


@dataclass(frozen=True)
class MeasureSettings:
    """What to measure and on how much data (the paper's flags)."""

    measures: tuple[str, ...] = ("dc",)
    batch_size: int = 4
    iter_num: int = 10
    accum_batch: int = 1
    dc_mode: str = "mean"  # "mean" (pooled) or "seq" (flattened frame sequences)
    sample_mode: str = "U"  # samples for streamed/cosine measures: U = utterances, T = frames
    thre: float = 0.99
    seed: int = 0
    pool_padding: bool = False
    pad_audio: bool = False  # the paper's batching: padded audio through the feature encoder

    def to_dict(self) -> dict:
        """The settings as a matrix file records them (JSON types)."""
        return {**self.__dict__, "measures": list(self.measures)}

    def validate(self) -> None:
        unknown = [m for m in self.measures if m not in ALL_MEASURES]
        if unknown:
            raise ComflpError(f"unknown measure(s) {unknown}; choose from {', '.join(ALL_MEASURES)}")
        if self.batch_size < 1 or self.iter_num < 1 or self.accum_batch < 1:
            raise ComflpError("batch_size, iter_num and accum_batch must be positive")
        if self.dc_mode not in ("mean", "seq"):
            raise ComflpError(f"--mode must be mean or seq, not {self.dc_mode!r}")
        if self.sample_mode not in ("U", "T"):
            raise ComflpError(f"sample mode must be U or T, not {self.sample_mode!r}")
        if not 0 < self.thre <= 1:
            raise ComflpError(f"--thre must be in (0, 1], not {self.thre}")
        per_batch = self.batch_size * self.accum_batch
        if {"dc_unbiased", "cka_unbiased"} & set(self.measures) and per_batch <= 3:
            raise ComflpError("unbiased estimators need more than 3 utterances per batch (batch_size x accum_batch)")
        if "dc" in self.measures and per_batch < 2:
            raise ComflpError("DC is a statistic of a batch of utterances: batch_size x accum_batch must be at "
                              "least 2 (the paper used 4 and 32)")
        streamed = set(STREAMED + PER_SAMPLE) & set(self.measures)
        if streamed and self.sample_mode == "U" and self.utterances_needed < 2:
            raise ComflpError(f"{', '.join(sorted(streamed))} over utterances need at least 2 of them "
                              "(batch_size x accum_batch x iter_num)")

    @property
    def utterances_needed(self) -> int:
        return self.batch_size * self.accum_batch * self.iter_num


MOMENT_MEMORY_GB = 0.5
SAMPLE_CHUNK = 1024  # samples per product: bounds the float64 copies of one micro-batch's rows and columns


def plan_bands(dims: Sequence[int], budget_bytes: float) -> list[tuple[int, int]]:
    """Layer bands ``[a, b)``, one per pass over the data, whose float64 moments fit in ``budget_bytes`` each.

    A band holds, for each layer i in a..b-1, the moment of layer i against
    layers i..L (``dims[i] x sum(dims[i:])`` float64): the upper triangle of
    the joint moment, every pair (i, j), i <= j, once over all bands. A band
    always holds at least one layer.

    >>> plan_bands([4] * 5, 1e9)
    [(0, 5)]
    >>> plan_bands([4] * 5, 8 * 4 * (20 + 16))  # layers 0-1 (20 + 16 columns), then 2-4 (12 + 8 + 4)
    [(0, 2), (2, 5)]
    """
    n = len(dims)
    row_bytes = [8.0 * dims[i] * sum(dims[i:]) for i in range(n)]
    bands, a = [], 0
    while a < n:
        b, size = a + 1, row_bytes[a]
        while b < n and size + row_bytes[b] <= budget_bytes:
            size += row_bytes[b]
            b += 1
        bands.append((a, b))
        a = b
    return bands


@dataclass
class KeptSamples:
    """The first pass's streamed samples, kept while they fit in ``budget`` bytes, so that the later band
    passes add them again instead of running the model again (the same tensors: the same sums, bit for bit).

    Frames are kept in the model's dtype (their float64 copy is exact); pooled utterances are float64 already.
    Past the budget everything kept is dropped (``complete`` is then False) and the model runs each pass.
    """

    budget: float
    samples: list[torch.Tensor] | None = field(default_factory=list)
    nbytes: int = 0

    @property
    def complete(self) -> bool:
        return self.samples is not None

    def add(self, samples: torch.Tensor) -> None:
        if self.samples is None:
            return
        self.nbytes += samples.numel() * samples.element_size()
        if self.nbytes > self.budget:
            self.samples = None
        else:
            self.samples.append(samples)


@dataclass
class Statistics:
    """Running sums; everything is float64 and additive over batches and processes.

    The streamed measures' second moment is held one layer band at a time
    (:func:`plan_bands`): ``moment[k]`` is layer ``band[0] + k`` against the
    layers from it on, [D, sum of their D], uncentred. The first pass also sums every layer's own
    moment outside the first band (``diag``), from which each layer's side of
    the measures is computed once; a band's pairs are turned into values as
    soon as the band is complete (``pairs``), and the band's moment is freed.
    """

    dims: list[int] = field(default_factory=list)
    batch_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    num_batches: int = 0
    count: int = 0  # samples in the streamed/cosine sums
    first: torch.Tensor | None = None  # [F]
    band: tuple[int, int] | None = None
    moment: list[torch.Tensor] | None = None  # per layer i of the band: [D_i, D_i + ... + D_L]
    diag: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [D, D], layers outside the first band
    cos_sum: torch.Tensor | None = None
    ang_sum: torch.Tensor | None = None
    num_utterances: int = 0
    num_frames: int = 0
    sides: dict[str, list] = field(default_factory=dict)
    pairs: dict[str, torch.Tensor] = field(default_factory=dict)  # streamed measure -> [L+1, L+1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"batch_{k}": v for k, v in self.batch_sums.items()}
        out.update({f"diag_{k}": v for k, v in self.diag.items()})
        out.update({f"moment_{k}": v for k, v in enumerate(self.moment or [])})
        for name in ("first", "cos_sum", "ang_sum"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["counts"] = torch.tensor([self.num_batches, self.count, self.num_utterances, self.num_frames],
                                     dtype=torch.float64)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            if k.startswith("batch_"):
                self.batch_sums[k[6:]] = v
            elif k.startswith("diag_"):
                self.diag[int(k[5:])] = v
            elif k.startswith("moment_"):
                self.moment[int(k[7:])] = v
            elif k == "counts":
                self.num_batches, self.count, self.num_utterances, self.num_frames = (int(x) for x in v.tolist())
            else:
                setattr(self, k, v)


def _add(current: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if current is None else current + value


def _samples(states: list[torch.Tensor], mask: torch.Tensor, settings: MeasureSettings,
             pooled: torch.Tensor | None) -> torch.Tensor:
    """Streamed/cosine samples [L+1, N, D]: pooled utterances (mode U) or real frames (mode T)."""
    if settings.sample_mode == "U":
        return pooled if pooled is not None else pool(states, mask, pool_padding=settings.pool_padding)
    keep = mask.reshape(-1).bool()
    return torch.stack([s.reshape(-1, s.shape[-1])[keep].to(torch.float64) for s in states])


def _add_band(stats: Statistics, samples: torch.Tensor) -> None:
    """Add ``samples`` [L+1, N, D] to the moment of the current band."""
    a, b = stats.band
    offsets = [0]
    for d in stats.dims[a:]:
        offsets.append(offsets[-1] + d)
    if stats.moment is None:
        stats.moment = [torch.zeros(stats.dims[i], offsets[-1] - offsets[i - a], dtype=torch.float64,
                                    device=samples.device) for i in range(a, b)]
    for start in range(0, samples.shape[1], SAMPLE_CHUNK):
        part = samples[:, start: start + SAMPLE_CHUNK]
        cols = part[a:].permute(1, 0, 2).reshape(part.shape[1], -1)  # [n, features from the band on]
        for k, i in enumerate(range(a, b)):
            stats.moment[k].addmm_(part[i].T, cols[:, offsets[i - a]:])


def update(stats: Statistics, states: list[torch.Tensor], mask: torch.Tensor, settings: MeasureSettings,
           pooled: torch.Tensor | None = None, *, moment_bytes: float = MOMENT_MEMORY_GB * 2**30
           ) -> torch.Tensor | None:
    """Add one micro-batch's per-sample statistics (streamed and cosine measures) in the first pass.

    ``pooled`` ([L, B, D], from :func:`pool`) saves pooling twice in mode U;
    ``moment_bytes`` bounds the streamed measures' moment (:func:`plan_bands`).
    Returns the samples [L+1, N, D] it added (float64), None when no measure wants samples.
    """
    want = set(settings.measures)
    if not want & set(STREAMED + PER_SAMPLE):
        return None
    samples = _samples(states, mask, settings, pooled)
    stats.dims = [s.shape[-1] for s in states]
    stats.count += samples.shape[1]
    if want & set(STREAMED):
        if stats.band is None:
            stats.band = plan_bands(stats.dims, moment_bytes)[0]
        stats.first = _add(stats.first, samples.sum(1).reshape(-1))
        _add_band(stats, samples)
        for layer in range(stats.band[1], len(stats.dims)):
            x = samples[layer]
            stats.diag[layer] = x.T @ x if layer not in stats.diag else stats.diag[layer].addmm_(x.T, x)
    if want & set(PER_SAMPLE):
        cos, ang = M.cosine_sums(samples)
        stats.cos_sum = _add(stats.cos_sum, cos)
        stats.ang_sum = _add(stats.ang_sum, ang)
    return samples



def update_per_batch(stats: Statistics, vectors: torch.Tensor, settings: MeasureSettings) -> None:
    """Add one (accumulated) batch's per-batch matrices. vectors: [L, B, D]."""
    for name in PER_BATCH:
        if name not in settings.measures:
            continue
        if name == "cka_unbiased":
            m = M.cka_unbiased_matrix(vectors)
        else:
            m = M.dc_matrix(vectors, unbiased=name == "dc_unbiased")
        stats.batch_sums[name] = _add(stats.batch_sums.get(name), m)
    stats.num_batches += 1


def _check_streamed(stats: Statistics, settings: MeasureSettings) -> None:
    if "pwcca" in settings.measures and stats.count < max(stats.dims):
        raise ComflpError(f"pwcca needs at least as many samples as features per layer: {stats.count} "
                          f"sample(s) < {max(stats.dims)} features; measure more utterances or use "
                          "--svcca_mode T (frames as samples)")
    if "svcca" in settings.measures and stats.count < 2 * max(stats.dims):
        log.warning("svcca from %d samples of %d features per layer: canonical correlations are biased "
                    "towards 1 with so few samples; measure more utterances or use mode T (frames)",
                    stats.count, max(stats.dims))


def finish_band(stats: Statistics, settings: MeasureSettings, *, progress: bool = False) -> None:
    """Turn the complete (all-reduced) moment of the current band into pair values, and free it.

    Centred cross moments are ``C_ij = S_ij - n m_i m_j^T`` (S: uncentred sum, m: means, n: samples).
    The first call also computes every layer's side of each measure (:func:`comflp.measures.layer_side`).
    """
    blk = M.layer_slices(stats.dims)
    mean = stats.first / stats.count
    a, b = stats.band
    streamed = [m for m in settings.measures if m in STREAMED]

    def centred(i: int, j: int) -> torch.Tensor:  # C_ij for i in the band, j >= i
        off = blk[i].start
        return (stats.moment[i - a][:, blk[j].start - off: blk[j].stop - off]
                - stats.count * torch.outer(mean[blk[i]], mean[blk[j]]))

    if not stats.sides:
        _check_streamed(stats, settings)
        own = {i: centred(i, i) for i in range(a, b)}
        for i, d in stats.diag.items():  # centred in place: the uncentred sums are not needed again
            own[i] = d.sub_(stats.count * torch.outer(mean[blk[i]], mean[blk[i]]))
        stats.diag = {}
        for name in streamed:
            stats.sides[name] = M.map_on_threads(
                lambda i: M.layer_side(own[i], name, thre=settings.thre, mean=mean[blk[i]]),  # noqa: B023 (run now)
                range(len(stats.dims)))
            stats.pairs[name] = torch.eye(len(stats.dims), dtype=torch.float64)
        del own  # what a side keeps of it (PWCCA's moment) stays with the side
    pairs = [(i, j) for i in range(a, b) for j in range(i + 1, len(stats.dims))]
    with tqdm(total=len(pairs), desc=f"layer pairs {a}-{b - 1}", unit="pair", disable=not progress) as bar:
        values = M.pair_values(streamed, stats.sides, pairs, centred, count=stats.count, progress=bar.update)
    for (i, j), v in zip(pairs, values):
        for name in streamed:
            stats.pairs[name][i, j] = stats.pairs[name][j, i] = v[name]
    stats.moment = None


def finalize(stats: Statistics, settings: MeasureSettings, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """Matrices [L+1, L+1] float64 from (all-reduced) statistics; every band finished."""
    if stats.moment is not None:
        finish_band(stats, settings, progress=progress)
    out: dict[str, torch.Tensor] = {}
    for name in settings.measures:
        if name in PER_BATCH:
            out[name] = stats.batch_sums[name] / stats.num_batches
        elif name in STREAMED:
            out[name] = stats.pairs[name]
        else:
            s = stats.cos_sum if name == "cosine" else stats.ang_sum
            m = s / stats.count if name == "cosine" else 1.0 - s / stats.count
            m.fill_diagonal_(1.0)
            out[name] = m
    return out


# repeating a corpus more often than this adds no information, only time (and the order list's memory)
MAX_PASSES = 100


def select_utterances(utts: Sequence[Utterance], settings: MeasureSettings) -> list[Utterance]:
    """The seeded sample measured: the first N of seeded permutations of the corpus.

    Like iterating a shuffled loader for more steps than one epoch, a request
    for more utterances than the corpus holds continues with a new permutation
    (utterances then repeat; a warning says so). A batch never holds an
    utterance twice: it is drawn from one permutation (a permutation's tail too
    short for a whole batch is skipped), so a batch statistic (DC) never sees
    copies. For a per-batch measure a batch larger than the corpus is refused;
    more than ``MAX_PASSES`` passes over the corpus always are.
    """
    need = settings.utterances_needed
    per_batch = settings.batch_size * settings.accum_batch
    if per_batch > len(utts) and set(PER_BATCH) & set(settings.measures):
        raise ComflpError(f"a batch of {per_batch} utterances (batch_size x accum_batch) needs {per_batch} "
                          f"distinct utterances, and the corpus has {len(utts)}: a batch statistic of repeated "
                          "clips would be meaningless; lower --batch_size or measure a larger corpus")
    if need > MAX_PASSES * len(utts):
        raise ComflpError(f"{need} utterances requested (batch_size x accum_batch x iter_num) from a corpus of "
                          f"{len(utts)}: {need / len(utts):.0f} passes over it; at most {MAX_PASSES} (repeating "
                          "utterances adds no information): lower --iter_num")
    gen = torch.Generator().manual_seed(settings.seed)
    if need <= len(utts):
        order = torch.randperm(len(utts), generator=gen)[:need].tolist()
    else:
        log.warning("%d utterances requested from a corpus of %d: %.1f passes, utterances repeat (never within "
                    "a batch)", need, len(utts), need / len(utts))
        order = []
        # the batches one permutation holds whole (a batch larger than the corpus, allowed for streamed
        # measures, whose value a batch does not change, takes whole permutations)
        whole = len(utts) - len(utts) % per_batch if per_batch <= len(utts) else len(utts)
        while len(order) < need:
            order += torch.randperm(len(utts), generator=gen)[:whole].tolist()
    return [utts[i] for i in order[:need]]


def _reduce(stats: Statistics, accelerator, *, moment_only: bool = False) -> None:
    """Sum the statistics over processes (after a later pass only its band's moment is new) and move them to the CPU."""
    if accelerator is not None and accelerator.num_processes > 1:
        tensors = ({f"moment_{k}": v for k, v in enumerate(stats.moment)} if moment_only else stats.tensors())
        reduced = accelerator.reduce({k: v.to(accelerator.device) for k, v in tensors.items()}, reduction="sum")
        stats.load_tensors({k: v.cpu() for k, v in reduced.items()})
    for name in ("first", "cos_sum", "ang_sum"):
        if getattr(stats, name) is not None:
            setattr(stats, name, getattr(stats, name).cpu())
    if stats.moment is not None:
        stats.moment = [m.cpu() for m in stats.moment]
    stats.batch_sums = {k: v.cpu() for k, v in stats.batch_sums.items()}
    stats.diag = {k: v.cpu() for k, v in stats.diag.items()}


@torch.inference_mode()
def collect(model, feature_extractor, utts: Sequence[Utterance], settings: MeasureSettings, *,
            accelerator=None, progress: bool = True, moment_memory_gb: float = MOMENT_MEMORY_GB,
            stack: str = "encoder", tokenizer=None,
            prompt: Prompt | None = None) -> tuple[dict[str, torch.Tensor], Statistics]:
    """Run the model over the selected utterances and return all requested matrices.

    ``accelerator`` (an ``accelerate.Accelerator``) shards the batches over
    processes and all-reduces the statistics; None runs in this process only.
    ``moment_memory_gb`` bounds the streamed measures' second moment: when the
    [F, F] moment of all (L+1) x D features does not fit, it is accumulated one
    layer band per pass over the same utterances (:func:`plan_bands`), giving
    the same matrices at the cost of more forward passes.
    ``stack``: the layer stack measured. An encoder-decoder model's ``"decoder"`` runs under teacher forcing
    on the utterances' transcripts (tokenized by ``tokenizer``), its states pooled over the decoder's input
    tokens; its causal self-attention makes each token's states independent of the padding after it.
    """
    settings.validate()
    require(model, "measure", "measuring")
    sr = int(feature_extractor.sampling_rate)
    least = min_audio_samples(model, feature_extractor)
    usable, short = [], []
    for u in utts:
        (usable if num_samples(u, sr) >= least else short).append(u)
    if short:
        log.warning("dropped %d utterance(s) shorter than the model's receptive field (%.0f ms), e.g. %s",
                    len(short), 1000 * least / sr, ", ".join(u.utt_id for u in short[:3]))
    if not usable:
        raise ComflpError("no utterance is long enough to give the model one frame")
    if moment_memory_gb <= 0:
        raise ComflpError(f"--moment_memory_gb must be positive, not {moment_memory_gb}")
    chosen = select_utterances(usable, settings)
    per_batch = settings.batch_size * settings.accum_batch
    # streamed measures do not depend on how utterances are batched (batch invariance): a batch larger than
    # the corpus runs in forward passes of at most the corpus, so memory does not grow with --batch_size
    # (per-batch measures never get here with such a batch: select_utterances refuses it)
    forward_batch = min(settings.batch_size, len(usable))
    batches = [chosen[i: i + per_batch] for i in range(0, len(chosen), per_batch)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if len(batches) < world:
        raise ComflpError(f"{len(batches)} batch(es) cannot be shared by {world} processes: raise --iter_num")
    mine = batches[rank::world]
    device = next(model.parameters()).device
    budget = moment_memory_gb * 2**30
    stats = Statistics()
    kept = KeptSamples(budget)

    if stack == "decoder" and (tokenizer is None or any(u.text is None for u in chosen)):
        raise ComflpError("measuring a decoder needs transcripts and the model's tokenizer (teacher forcing)")
    if stack == "decoder":
        check_known_tokens([u.text for u in chosen], tokenizer, what="transcripts measured")
    # the decoder is measured inside the prompt it decodes with (comflp.prompt)
    prompt = check_prompt(model, prompt) if stack == "decoder" else Prompt()

    show = progress and rank == 0

    def one_pass(desc: str, first_pass: bool) -> None:
        if not first_pass and kept.complete:
            for samples in tqdm(kept.samples, desc=desc + ", kept samples", unit="batch", disable=not show):
                _add_band(stats, samples.to(torch.float64))
            return
        with capture_layer_states(model, stack) as states:
            for group in tqdm(mine, desc=desc, unit="batch", disable=not show):
                vectors = []
                for start in range(0, len(group), forward_batch):
                    batch = collate(group[start: start + forward_batch], feature_extractor).to(device)
                    mask = forward_stack(model, batch, states, stack, tokenizer=tokenizer, prompt=prompt,
                                         pad_audio=settings.pad_audio)
                    if not first_pass:
                        _add_band(stats, _samples(states, mask, settings, None))
                        continue
                    stats.num_utterances += mask.shape[0]
                    stats.num_frames += int(mask.sum())
                    pooled = pool(states, mask, pool_padding=settings.pool_padding)
                    vectors.append(flatten_sequences(states, mask) if settings.dc_mode == "seq" else pooled)
                    samples = update(stats, states, mask, settings, pooled, moment_bytes=budget)
                    if samples is not None and stats.band not in (None, (0, len(stats.dims))):  # passes to come
                        kept.add(samples if settings.sample_mode == "U" else samples.to(states[0].dtype))
                if first_pass and set(PER_BATCH) & set(settings.measures):
                    if settings.dc_mode == "seq":
                        width = min(v.shape[-1] for v in vectors)
                        vectors = [v[..., :width] for v in vectors]
                    update_per_batch(stats, torch.cat(vectors, dim=1).cpu(), settings)

    def maths(step, *args, **kwargs):
        try:
            return step(*args, **kwargs)
        except ValueError as err:  # a measure undefined on these samples (measures.py says which and why)
            raise ComflpError(f"cannot compute the matrices from {stats.num_utterances} utterances ({stats.count} "
                              f"samples): {err}; measure more utterances (batch_size x iter_num) or leave that "
                              "measure out") from None

    one_pass("measuring", first_pass=True)
    _reduce(stats, accelerator)
    if stats.band is not None:
        bands = plan_bands(stats.dims, budget)
        if len(bands) > 1:
            log.info("the moment of %d features exceeds --moment_memory_gb %g: %d passes over the data, one band "
                     "of layers each (%s)", sum(stats.dims), moment_memory_gb, len(bands),
                     "over the samples kept from the first" if kept.complete else "running the model each time")
        maths(finish_band, stats, settings, progress=show)
        for k, band in enumerate(bands[1:], 2):
            stats.band = band
            one_pass(f"measuring (pass {k}/{len(bands)}, layers {band[0]}-{band[1] - 1})", first_pass=False)
            _reduce(stats, accelerator, moment_only=True)
            maths(finish_band, stats, settings, progress=show)
    return maths(finalize, stats, settings, progress=show), stats
