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
  frame of thousands of utterances at fixed memory ([F, F] float64 with
  F = (L+1) x D);
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
from .errors import ComflpError
from .model import encoder_layers, forward, frame_mask, min_audio_samples

log = logging.getLogger(__name__)

PER_BATCH = ("dc", "dc_unbiased", "cka_unbiased")
STREAMED = ("svcca", "pwcca", "cka")
PER_SAMPLE = ("cosine", "angular")
ALL_MEASURES = PER_BATCH + STREAMED + PER_SAMPLE


@contextlib.contextmanager
def capture_layer_states(model) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward fills the yielded list with L+1 tensors [B, T, D]."""
    layers = encoder_layers(model)
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


@dataclass
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


@dataclass
class Statistics:
    """Running sums; everything is float64 and additive over batches and processes."""

    num_layers: int
    dims: list[int] = field(default_factory=list)
    batch_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    num_batches: int = 0
    count: int = 0  # samples in the streamed/cosine sums
    first: torch.Tensor | None = None  # [F]
    second: torch.Tensor | None = None  # [F, F]
    cos_sum: torch.Tensor | None = None
    ang_sum: torch.Tensor | None = None
    num_utterances: int = 0
    num_frames: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"batch_{k}": v for k, v in self.batch_sums.items()}
        for name in ("first", "second", "cos_sum", "ang_sum"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["counts"] = torch.tensor([self.num_batches, self.count, self.num_utterances, self.num_frames],
                                     dtype=torch.float64)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            if k.startswith("batch_"):
                self.batch_sums[k[6:]] = v
            elif k == "counts":
                self.num_batches, self.count, self.num_utterances, self.num_frames = (int(x) for x in v.tolist())
            else:
                setattr(self, k, v)


def _add(current: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if current is None else current + value


def update(stats: Statistics, states: list[torch.Tensor], mask: torch.Tensor, settings: MeasureSettings,
           pooled: torch.Tensor | None = None) -> None:
    """Add one micro-batch's per-sample statistics (streamed and cosine measures).

    ``pooled`` ([L, B, D], from :func:`pool`) saves pooling twice in mode U.
    """
    want = set(settings.measures)
    if not want & set(STREAMED + PER_SAMPLE):
        return
    if settings.sample_mode == "U":
        samples = pooled if pooled is not None else pool(states, mask, pool_padding=settings.pool_padding)
    else:
        keep = mask.reshape(-1).bool()
        samples = torch.stack([s.reshape(-1, s.shape[-1])[keep].to(torch.float64) for s in states])
    stats.dims = [s.shape[-1] for s in states]
    stats.count += samples.shape[1]
    if want & set(STREAMED):
        flat = samples.permute(1, 0, 2).reshape(samples.shape[1], -1)  # [N, F]
        stats.first = _add(stats.first, flat.sum(0))
        if stats.second is None:
            stats.second = flat.T @ flat
        else:
            stats.second.addmm_(flat.T, flat)
    if want & set(PER_SAMPLE):
        cos, ang = M.cosine_sums(samples)
        stats.cos_sum = _add(stats.cos_sum, cos)
        stats.ang_sum = _add(stats.ang_sum, ang)


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


def finalize(stats: Statistics, settings: MeasureSettings) -> dict[str, torch.Tensor]:
    """Matrices [L+1, L+1] float64 from (all-reduced) statistics."""
    out: dict[str, torch.Tensor] = {}
    for name in settings.measures:
        if name in PER_BATCH:
            out[name] = stats.batch_sums[name] / stats.num_batches
        elif name in STREAMED:
            mean = stats.first / stats.count
            cov = stats.second - stats.count * torch.outer(mean, mean)
            if name == "pwcca" and stats.count < max(stats.dims):
                raise ComflpError(f"pwcca needs at least as many samples as features per layer: {stats.count} "
                                  f"sample(s) < {max(stats.dims)} features; measure more utterances or use "
                                  "--svcca_mode T (frames as samples)")
            if name == "svcca" and stats.count < 2 * max(stats.dims):
                log.warning("svcca from %d samples of %d features per layer: canonical correlations are biased "
                            "towards 1 with so few samples; measure more utterances or use mode T (frames)",
                            stats.count, max(stats.dims))
            out[name] = M.matrix_from_cov(cov, stats.dims, name, thre=settings.thre, mean=mean, count=stats.count)
        else:
            s = stats.cos_sum if name == "cosine" else stats.ang_sum
            m = s / stats.count if name == "cosine" else 1.0 - s / stats.count
            m.fill_diagonal_(1.0)
            out[name] = m
    return out


def select_utterances(utts: Sequence[Utterance], settings: MeasureSettings) -> list[Utterance]:
    """The seeded sample measured: the first N of seeded permutations of the corpus.

    Like iterating a shuffled loader for more steps than one epoch, a request
    for more utterances than the corpus holds continues with a new permutation
    (utterances then repeat; a warning says so).
    """
    need = settings.utterances_needed
    gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(len(utts), generator=gen).tolist()
    if need > len(utts):
        log.warning("%d utterances requested from a corpus of %d: %.1f passes, utterances repeat",
                    need, len(utts), need / len(utts))
    return [utts[i] for i in order[:need]]


@torch.inference_mode()
def collect(model, feature_extractor, utts: Sequence[Utterance], settings: MeasureSettings, *,
            accelerator=None, progress: bool = True) -> tuple[dict[str, torch.Tensor], Statistics]:
    """Run the model over the selected utterances and return all requested matrices.

    ``accelerator`` (an ``accelerate.Accelerator``) shards the batches over
    processes and all-reduces the statistics; None runs in this process only.
    """
    settings.validate()
    sr = int(feature_extractor.sampling_rate)
    least = min_audio_samples(model)
    usable, short = [], []
    for u in utts:
        (usable if num_samples(u, sr) >= least else short).append(u)
    if short:
        log.warning("dropped %d utterance(s) shorter than the model's receptive field (%.0f ms), e.g. %s",
                    len(short), 1000 * least / sr, ", ".join(u.utt_id for u in short[:3]))
    if not usable:
        raise ComflpError("no utterance is long enough to give the model one frame")
    chosen = select_utterances(usable, settings)
    per_batch = settings.batch_size * settings.accum_batch
    batches = [chosen[i: i + per_batch] for i in range(0, len(chosen), per_batch)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if len(batches) < world:
        raise ComflpError(f"{len(batches)} batch(es) cannot be shared by {world} processes: raise --iter_num")
    mine = batches[rank::world]
    device = next(model.parameters()).device
    stats = Statistics(num_layers=len(encoder_layers(model)) + 1)
    with capture_layer_states(model) as states:
        for group in tqdm(mine, desc="measuring", unit="batch", disable=not progress or rank != 0):
            vectors = []
            for start in range(0, len(group), settings.batch_size):
                batch = collate(group[start: start + settings.batch_size], feature_extractor).to(device)
                forward(model, batch.input_values, batch.attention_mask, pad_audio=settings.pad_audio)
                mask = frame_mask(model, batch.attention_mask, states[0].shape[1])
                stats.num_utterances += mask.shape[0]
                stats.num_frames += int(mask.sum())
                pooled = pool(states, mask, pool_padding=settings.pool_padding)
                vectors.append(flatten_sequences(states, mask) if settings.dc_mode == "seq" else pooled)
                update(stats, states, mask, settings, pooled)
            if set(PER_BATCH) & set(settings.measures):
                if settings.dc_mode == "seq":
                    width = min(v.shape[-1] for v in vectors)
                    vectors = [v[..., :width] for v in vectors]
                update_per_batch(stats, torch.cat(vectors, dim=1).cpu(), settings)
    if accelerator is not None and world > 1:
        tensors = {k: v.to(accelerator.device) for k, v in stats.tensors().items()}
        reduced = accelerator.reduce(tensors, reduction="sum")
        stats.load_tensors({k: v.cpu() for k, v in reduced.items()})
    return finalize(_to_cpu(stats), settings), stats


def _to_cpu(stats: Statistics) -> Statistics:
    for name in ("first", "second", "cos_sum", "ang_sum"):
        if getattr(stats, name) is not None:
            setattr(stats, name, getattr(stats, name).cpu())
    stats.batch_sums = {k: v.cpu() for k, v in stats.batch_sums.items()}
    return stats
