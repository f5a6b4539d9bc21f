"""Repair at the cut without training: fit what a removed block did and fold it into the kept weights.

Removing block [a, b] (1-based layers) connects hidden state ``i = a - 1`` to layer ``b + 1`` where the
full model fed it hidden state ``j = b`` (states as in :mod:`comflp.hidden`: 0 is the input of layer 1,
l the output of layer l). A repair fits, on calibration activations, a map that makes the state after
the cut resemble ``h_j``, and folds it into the weights of the module that ends state ``i``, so the
result is a plain checkpoint (the family table says where: ``end_norm``, ``ffn_output``,
``input_norm``):

- **post-LN layers** end in a LayerNorm, ``h_i = γ ⊙ n + β``. ``affine`` fits ``h_j ≈ s ⊙ h_i + c`` per
  channel and folds exactly: ``γ ← s ⊙ γ``, ``β ← s ⊙ β + c``. A full map cannot fold into a LayerNorm
  (``linear`` is refused there). State 0 of a post-LN encoder is a LayerNorm's output too.
- **pre-LN layers** end in a residual sum ``h_i = r + f``, ``f = z Wᵀ + w`` the feed-forward's output
  projection. ``linear`` fits ``h_j ≈ r + f T + c`` (ReplaceMe's map), i.e. ``Y = h_j - h_i + f ≈ f T + c``,
  and folds exactly: ``W ← Tᵀ W``, ``w ← w T + c``. ``affine`` is the diagonal ``T``. State 0 of a
  pre-LN stack is no module's plain output: a cut starting at layer 1 there is left unrepaired (said
  in the log and the record).

The fit is centred least squares in float64 with a ridge term. With ``X`` the inputs [N, D] and ``Y`` the
targets [N, D] over every position the rest of the model reads (real frames; the whole window of an
encoder whose decoder reads it whole, as Whisper's does; a decoder's tokens) of the calibration set, ``x̄, ȳ`` their means,
``Sxx = Σ (x - x̄)ᵀ(x - x̄)``, ``Sxy = Σ (x - x̄)ᵀ(y - ȳ)``, ``λ = ridge · tr(Sxx) / D``::

    T = (Sxx + λ I)⁻¹ Sxy        c = ȳ - x̄ T          (affine: per channel, T diagonal)

which is ``numpy.linalg.lstsq`` on ``[X, 1]`` when ``ridge`` is 0. How well it fits is the R² of the
state after the cut against ``h_j``: ``1 - Σ‖h_j - ĥ_j‖² / Σ‖h_j - mean(h_j)‖²``, beside the same figure
unrepaired (``ĥ_j = h_i``). Every sum is streamed over batches (no activation is kept), over those
positions only, and each utterance's states are those it has alone (:func:`comflp.model.forward`), so
the fit does not depend on the batch size. One calibration pass over the full model serves every cut.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .data import Utterance, collate, length_sorted_batches
from .errors import ComflpError
from .model import base_model, encoder_config, family_of, stack_layers
from .model.families import get_module
from .heads import check_prompt
from .prompt import Prompt
from .strategy import DEFAULT_CALIB_UTTS, DEFAULT_REPAIR_RIDGE as DEFAULT_RIDGE, REPAIR_KINDS, to_blocks, validate

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CALIB_UTTS", "DEFAULT_RIDGE", "REPAIR_KINDS", "Cut", "CutMap", "Repair", "applied", "collect",
           "cuts_of", "fit", "fit_all", "fit_repair", "fold", "fold_into_pruned", "fold_site", "foldable_kinds", "state_site"]


@dataclass(frozen=True)
class Cut:
    """Block [``start + 1``, ``end``] removed from ``stack``: hidden state ``start`` stands in for ``end``."""

    stack: str
    start: int
    end: int

    @property
    def block(self) -> tuple[int, int]:
        """The removed block, 1-based layers."""
        return self.start + 1, self.end


def cuts_of(pruned: Iterable[int], num_layers: int, stack: str = "encoder") -> list[Cut]:
    """The cuts of a strategy: one per contiguous block of the 1-based layers ``pruned``."""
    return [Cut(stack, a - 1, b) for a, b in to_blocks(validate(list(pruned), num_layers))]


@dataclass(frozen=True)
class Site:
    """Where a cut's map folds: a LayerNorm (``"norm"``, post-LN) or a feed-forward output projection
    (``"ffn"``, pre-LN); ``path`` names it for the record."""

    kind: str
    module: nn.Module
    path: str


def _pre_norm(model) -> bool:
    family = family_of(model)
    if family.end_norm is None:
        return True
    return bool(family.pre_norm_field and getattr(encoder_config(model), family.pre_norm_field, False))


def fold_site(model, cut: Cut) -> Site | None:
    """The module whose output is hidden state ``cut.start`` and can absorb a map (:func:`state_site`)."""
    return state_site(model, cut.stack, cut.start)


def state_site(model, stack: str, state: int) -> Site | None:
    """The module whose output is hidden state ``state`` of ``stack`` and can absorb a map, or None (state 0 of a
    pre-LN stack, or of a family whose state 0 no LayerNorm ends)."""
    family = family_of(model)
    if state == 0:
        if stack != "encoder" or _pre_norm(model) or family.input_norm is None:
            return None
        module = get_module(base_model(model), family.input_norm)
        return Site("norm", module, family.input_norm) if isinstance(module, nn.LayerNorm) else None
    layer = stack_layers(model, stack)[state - 1]
    where = f"{stack} layer {state}"
    if not _pre_norm(model):
        module = get_module(layer, family.end_norm)
        if not isinstance(module, nn.LayerNorm) or module.weight is None:
            raise ComflpError(f"{where} does not end in a LayerNorm with weights ({family.end_norm}): comflp "
                              "cannot fold a repair into it")
        if module.bias is None:  # LASR's: the map's shift has nowhere to go without adding a parameter
            raise ComflpError(f"{where} ends in a LayerNorm without a bias ({family.end_norm}): a repair's shift "
                              "cannot fold into it and keep the checkpoint plain; use --repair none")
        return Site("norm", module, f"{where} {family.end_norm}")
    if family.ffn_extra and get_module(layer, family.ffn_extra) is not None:
        raise ComflpError(f"{where} adds {family.ffn_extra} after its feed-forward (MMS adapters): a repair "
                          "cannot fold into it exactly; use --repair none")
    module = get_module(layer, family.ffn_output) if family.ffn_output else None
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise ComflpError(f"{where}: no feed-forward output projection with a bias ({family.ffn_output}) to fold "
                          "a repair into")
    return Site("ffn", module, f"{where} {family.ffn_output}")


def unrepairable(model, stack: str) -> str | None:
    """Why no cut of ``stack`` can take a repair (its layers have nothing a map folds into), or None when a cut
    after its first layer can."""
    if len(stack_layers(model, stack)) < 2:
        return f"the {stack} has one layer"
    try:
        state_site(model, stack, 1)
    except ComflpError as err:
        return str(err)
    return None


def check_kind(model, cuts: Sequence[Cut], kind: str) -> dict[Cut, Site | None]:
    """The fold site of every cut; ``linear`` on a post-LN site is refused in one line (a full map cannot fold
    into a LayerNorm)."""
    if kind not in REPAIR_KINDS:
        raise ComflpError(f"--repair must be one of {', '.join(REPAIR_KINDS)}, not {kind!r}")
    sites = {cut: fold_site(model, cut) for cut in cuts}
    if kind == "linear" and any(s is not None and s.kind == "norm" for s in sites.values()):
        raise ComflpError(f"--repair linear cannot fold into the LayerNorm that ends a post-LN layer "
                          f"({type(model).__name__}): use --repair affine")
    return sites


def foldable_kinds(model, *, layers: Sequence[int] = (), decoder_layers: Sequence[int] = ()) -> list[str]:
    """The repair kinds that fold into ``model`` with these 1-based layers removed: ``affine`` always,
    ``linear`` too when no cut ends at a post-LN layer's LayerNorm."""
    from .model import num_layers

    cuts = (cuts_of(layers, num_layers(model), "encoder") if layers else []) + (
        cuts_of(decoder_layers, num_layers(model, "decoder"), "decoder") if decoder_layers else [])
    sites = [fold_site(model, c) for c in cuts]
    return ["affine"] + (["linear"] if all(s is None or s.kind == "ffn" for s in sites) else [])


@dataclass
class CutStatistics:
    """Streamed float64 sums of one cut over the calibration frames.

    ``x``: the map's input (``h_i``, or the feed-forward output ``f`` of the layer before a pre-LN cut),
    ``y``: its target (``h_j``, or ``h_j - h_i + f``), ``h``: the state after the removed block (``h_j``).
    ``xx``/``xy``: [D, D] for ``linear``, the diagonals [D] for ``affine``.
    """

    full: bool
    count: int = 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    xx: torch.Tensor | None = None
    xy: torch.Tensor | None = None
    yy: torch.Tensor | None = None  # [D] per-channel Σ y²
    h: torch.Tensor | None = None  # [D] Σ h_j
    hh: torch.Tensor | None = None  # [D] Σ h_j²
    gap: torch.Tensor | None = None  # [D] Σ (h_j - h_i)², the unrepaired error

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, gap: torch.Tensor) -> None:
        """Add N frames: ``x``, ``y``, ``h``, ``gap`` = h_j - h_i, each [N, D] float64."""
        parts = {"x": x.sum(0), "y": y.sum(0), "yy": (y * y).sum(0), "h": h.sum(0), "hh": (h * h).sum(0),
                 "gap": (gap * gap).sum(0),
                 "xx": x.T @ x if self.full else (x * x).sum(0), "xy": x.T @ y if self.full else (x * y).sum(0)}
        for name, value in parts.items():
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)
        self.count += x.shape[0]


@dataclass(frozen=True)
class CutMap:
    """A fitted map ``x ↦ x T + c`` (``scale``: [D, D], or its diagonal [D] for ``affine``) and how well it fits."""

    cut: Cut
    site_path: str
    scale: torch.Tensor
    shift: torch.Tensor
    r2: float
    r2_unrepaired: float
    frames: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The map on ``x`` [..., D], in ``x``'s dtype."""
        scale, shift = self.scale.to(x), self.shift.to(x)
        return (x @ scale if scale.dim() == 2 else x * scale) + shift

    def record(self) -> dict:
        """What the strategy file, the pruned model's record and the card say of this cut."""
        return {"stack": self.cut.stack, "block": list(self.cut.block), "site": self.site_path,
                "r2": round(self.r2, 6), "r2_unrepaired": round(self.r2_unrepaired, 6), "frames": self.frames}


@dataclass(frozen=True)
class Skipped:
    """A cut no map folds into (state 0 of a pre-LN stack)."""

    cut: Cut
    reason: str

    def record(self) -> dict:
        return {"stack": self.cut.stack, "block": list(self.cut.block), "site": None, "skipped": self.reason}


@dataclass
class Repair:
    """Every cut's map (or why it has none), the settings and the calibration set."""

    kind: str
    ridge: float
    maps: list[CutMap] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0

    def for_stack(self, stack: str) -> list[CutMap]:
        return [m for m in self.maps if m.cut.stack == stack]

    def select(self, cuts: Iterable[Cut]) -> "Repair":
        """The same repair restricted to ``cuts`` (one candidate's, when a fine search fitted many)."""
        wanted = set(cuts)
        return Repair(self.kind, self.ridge, [m for m in self.maps if m.cut in wanted],
                      [s for s in self.skipped if s.cut in wanted], self.calibration, self.seconds)

    def record(self) -> dict:
        return {"kind": self.kind, "ridge": self.ridge, "calibration": self.calibration,
                "cuts": [m.record() for m in self.maps] + [s.record() for s in self.skipped],
                "seconds": round(self.seconds, 3)}


def fit(stats: CutStatistics, *, ridge: float = DEFAULT_RIDGE, what: str = "cut") -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(T, c, R², R² unrepaired) from a cut's sums (maths in the module docstring).

    The R² is of the state after the cut against ``h_j``; its error is the error in ``y`` (``ĥ_j - h_j =
    x T + c - y`` in both layer kinds). Raises one line when there are too few frames for the map, or when
    the fit is singular and ``ridge`` is 0.
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ComflpError(f"--repair_ridge must be a non-negative number, not {ridge}")
    n, dim = stats.count, stats.x.shape[0]
    need = dim + 2 if stats.full else 3
    if n < need:
        raise ComflpError(f"{what}: {n} calibration frame(s) for a {'%d x %d map' % (dim, dim) if stats.full else 'per-channel map'}: "
                          f"at least {need} are needed; raise --calib_utts")
    mx, my = stats.x / n, stats.y / n
    if stats.full:
        sxx = stats.xx - n * torch.outer(mx, mx)
        sxy = stats.xy - n * torch.outer(mx, my)
        lam = ridge * float(torch.diagonal(sxx).sum()) / dim
        a = sxx + lam * torch.eye(dim, dtype=sxx.dtype, device=sxx.device)
        chol, info = torch.linalg.cholesky_ex(a)
        # a relative pivot below float64's resolution is a singular system, whatever cholesky made of it
        tiny = torch.diagonal(chol).min() ** 2 <= 1e-12 * torch.diagonal(a).max()
        if int(info) != 0 or bool(tiny):
            raise ComflpError(f"{what}: the calibration inputs span fewer than their {dim} dimensions, so the "
                              "least-squares map is not unique; give --repair_ridge > 0 (e.g. 1e-4) or more "
                              "--calib_utts")
        scale = torch.cholesky_solve(sxy, chol)
        shift = my - mx @ scale
        sse = (stats.yy - n * my * my).sum() - 2 * (scale * sxy).sum() + (scale * (sxx @ scale)).sum()
    else:
        sxx = stats.xx - n * mx * mx
        sxy = stats.xy - n * mx * my
        lam = ridge * float(sxx.sum()) / dim
        denominator = sxx + lam
        if bool((denominator <= 1e-12 * denominator.abs().max().clamp(min=1e-300)).any()):
            raise ComflpError(f"{what}: a channel is constant over the calibration frames, so its scale is not "
                              "unique; give --repair_ridge > 0 (e.g. 1e-4)")
        scale = sxy / denominator
        shift = my - mx * scale
        sse = ((stats.yy - n * my * my) - 2 * scale * sxy + scale * scale * sxx).sum()
    sst = (stats.hh - stats.h * stats.h / n).sum()
    r2 = 1.0 - float(sse) / float(sst) if float(sst) > 0 else float("nan")
    r2_before = 1.0 - float(stats.gap.sum()) / float(sst) if float(sst) > 0 else float("nan")
    return scale, shift, r2, r2_before


@contextlib.contextmanager
def _capture_ffn(model, stack: str, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, each forward fills the yielded dict: 0-based layer -> its feed-forward output [B, T, D]."""
    family = family_of(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    for index in layers:
        module = get_module(stack_layers(model, stack)[index], family.ffn_output)

        def grab(mod, args, output, index=index):
            out[index] = output

        handles.append(module.register_forward_hook(grab))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def calibration_subset(utts: Sequence[Utterance], count: int, seed: int) -> list[Utterance]:
    """The first ``count`` utterances of a seeded permutation of ``utts`` (all of them when fewer)."""
    if count < 1:
        raise ComflpError(f"--calib_utts must be positive, not {count}")
    order = torch.randperm(len(utts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [utts[i] for i in order[:count]]


@torch.inference_mode()
def collect(model, feature_extractor, utts: Sequence[Utterance], cuts: Sequence[Cut], kind: str, *,
            batch_size: int = 8, tokenizer=None, prompt: Prompt | None = None, pad_audio: bool = False,
            progress: bool = True) -> dict[Cut, CutStatistics]:
    """One pass of the full ``model`` over ``utts``: every foldable cut's sums (:class:`CutStatistics`).

    The samples are the positions the rest of the model reads: an encoder's real frames (every position of
    a fixed window that the decoder reads whole: the family table's ``window_read_whole``), a decoder's
    tokens under teacher forcing on the transcripts (``tokenizer``, ``prompt``), its prompt's included.
    Utterances go in length-sorted batches of ``batch_size``; the sums do not depend on it.
    """
    from .hidden import capture_layer_states, forward_stack

    if batch_size < 1:
        raise ComflpError(f"--calib_batch_size must be positive, not {batch_size}")
    sites = check_kind(model, cuts, kind)
    cuts = [c for c in cuts if sites[c] is not None]
    stats = {c: CutStatistics(full=kind == "linear") for c in cuts}
    if not cuts:
        return stats
    stacks = sorted({c.stack for c in cuts})
    device = next(model.parameters()).device
    prompt = check_prompt(model, prompt) if "decoder" in stacks else Prompt()
    batches = length_sorted_batches(utts, batch_size=batch_size)
    for stack in stacks:
        mine = [c for c in cuts if c.stack == stack]
        ffn_layers = sorted({c.start - 1 for c in mine if sites[c].kind == "ffn"})
        with capture_layer_states(model, stack) as states, _capture_ffn(model, stack, ffn_layers) as ffn:
            for group in tqdm(batches, desc=f"calibrating the {stack} repair", unit="batch", disable=not progress):
                batch = collate(group, feature_extractor).to(device)
                # every position that the rest of the model reads: a decoder's prompt tokens (attended to by the
                # text's), and all of a fixed window that a decoder cross-attends to whole
                mask = forward_stack(model, batch, states, stack, tokenizer=tokenizer, prompt=prompt,
                                     pad_audio=pad_audio, with_prompt=True)
                if stack == "encoder" and family_of(model).window_read_whole:
                    mask = torch.ones_like(mask)
                mask = mask.reshape(-1).bool()

                def real(t: torch.Tensor) -> torch.Tensor:
                    return t.reshape(-1, t.shape[-1])[mask].to(torch.float64)

                for cut in mine:
                    before, after = real(states[cut.start]), real(states[cut.end])
                    if sites[cut].kind == "ffn":
                        f = real(ffn[cut.start - 1])
                        stats[cut].add(f, after - before + f, after, after - before)
                    else:
                        stats[cut].add(before, after, after, after - before)
    return stats


def fit_all(model, stats: dict[Cut, CutStatistics], cuts: Sequence[Cut], kind: str, *,
            ridge: float = DEFAULT_RIDGE) -> Repair:
    """Fit every cut's map from its sums; the cuts no map folds into are listed as skipped."""
    sites = check_kind(model, cuts, kind)
    repair = Repair(kind, ridge)
    for cut in cuts:
        a, b = cut.block
        if sites[cut] is None:
            repair.skipped.append(Skipped(cut, f"hidden state 0 of this {cut.stack} is no LayerNorm's output"))
            log.info("repair: %s block [%d, %d] starts at the first layer, where nothing folds: left unrepaired",
                     cut.stack, a, b)
            continue
        scale, shift, r2, before = fit(stats[cut], ridge=ridge, what=f"{cut.stack} block [{a}, {b}]")
        repair.maps.append(CutMap(cut, sites[cut].path, scale.cpu(), shift.cpu(), r2, before, stats[cut].count))
        log.info("repair: %s block [%d, %d] %s map at %s, R² %.4f (unrepaired %.4f) over %d frames", cut.stack,
                 a, b, kind, sites[cut].path, r2, before, stats[cut].count)
    return repair


def _site_module(model, cut: Cut, positions: dict[int, int] | None = None) -> Site:
    """The fold site of ``cut`` in ``model``; ``positions`` maps the full model's 0-based layer indices to a
    pruned model's (the site's layer is always kept)."""
    state = cut.start if positions is None or cut.start == 0 else positions[cut.start - 1] + 1
    site = state_site(model, cut.stack, state)
    assert site is not None
    return site


@torch.no_grad()
def fold(model, repair: Repair, *, kept: dict[str, Sequence[int]] | None = None) -> None:
    """Fold every map of ``repair`` into ``model``'s weights, in place (module docstring: exact).

    ``kept``: per stack, the 0-based layers of the full model that ``model`` (pruned) still has, in order;
    None when ``model`` is the full model.
    """
    for m in repair.maps:
        positions = {old: new for new, old in enumerate(kept[m.cut.stack])} if kept and m.cut.stack in kept else None
        site = _site_module(model, m.cut, positions)
        weight, bias = site.module.weight, site.module.bias
        scale = m.scale.to(weight.device, torch.float64)
        shift = m.shift.to(weight.device, torch.float64)
        w64, b64 = weight.to(torch.float64), bias.to(torch.float64)
        if site.kind == "norm":  # LN(x) s + c = (γ s) n + (β s + c)
            new_w, new_b = w64 * scale, b64 * scale + shift
        elif scale.dim() == 2:  # (z Wᵀ + w) T + c = z (Tᵀ W)ᵀ + (w T + c)
            new_w, new_b = scale.T @ w64, b64 @ scale + shift
        else:
            new_w, new_b = scale[:, None] * w64, b64 * scale + shift
        weight.copy_(new_w.to(weight.dtype))
        bias.copy_(new_b.to(bias.dtype))


@contextlib.contextmanager
def applied(model, repair: Repair | Sequence[CutMap]) -> Iterator[None]:
    """Within the block, ``model`` (the full model) applies each map as an explicit module on its fold site's
    output (a forward hook), without touching a weight: what :func:`fold` makes permanent."""
    maps = repair.maps if isinstance(repair, Repair) else list(repair)
    handles = []
    for m in maps:
        site = _site_module(model, m.cut)
        handles.append(site.module.register_forward_hook(lambda mod, args, out, m=m: m.apply(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fit_repair(loaded, utts: Sequence[Utterance], *, layers: Sequence[int] = (), decoder_layers: Sequence[int] = (),
               candidates: Sequence[Sequence[int]] = (), stack: str = "encoder", kind: str = "affine",
               ridge: float = DEFAULT_RIDGE, batch_size: int = 8, data: str = "", prompt: Prompt | None = None,
               pad_audio: bool = False, progress: bool = False) -> Repair:
    """The repair of removing the 1-based ``layers`` (``decoder_layers``: an encoder-decoder model's decoder's),
    and of every cut of the pruned sets ``candidates`` of ``stack``, each cut once, fitted on ``utts`` of
    ``loaded`` (a :class:`comflp.model.LoadedModel`): one calibration pass, one map per cut."""
    from .model import num_layers

    start = time.perf_counter()
    cuts: list[Cut] = []
    if layers:
        cuts += cuts_of(layers, num_layers(loaded.model), "encoder")
    if decoder_layers:
        cuts += cuts_of(decoder_layers, num_layers(loaded.model, "decoder"), "decoder")
    for pruned in candidates:
        cuts += [c for c in cuts_of(pruned, num_layers(loaded.model, stack), stack) if c not in cuts]
    if not cuts:
        raise ComflpError("no layer to prune, so nothing to repair")
    stats = collect(loaded.model, loaded.feature_extractor, utts, cuts, kind, batch_size=batch_size,
                    tokenizer=loaded.tokenizer, prompt=prompt, pad_audio=pad_audio, progress=progress)
    fitted = fit_all(loaded.model, stats, cuts, kind, ridge=ridge)
    fitted.calibration = {"data": data, "utterances": len(utts),
                          "frames": {s: max((v.count for c, v in stats.items() if c.stack == s), default=0)
                                     for s in sorted({c.stack for c in cuts})}}
    fitted.seconds = time.perf_counter() - start
    return fitted


def fold_into_pruned(pruned, model, repair: Repair, plan: dict[str, Sequence[int]]) -> None:
    """Fold ``repair`` into ``pruned``: ``model`` without the 1-based layers ``plan[stack]`` of each stack. One
    line when the repair was fitted for other layers."""
    from .model import num_layers

    fitted = {stack: sorted(i for m in [*repair.maps, *repair.skipped] if m.cut.stack == stack
                            for i in range(m.cut.block[0], m.cut.block[1] + 1)) for stack in plan}
    if any(fitted[stack] != sorted(plan[stack]) for stack in plan):
        raise ComflpError(f"the repair was fitted for other layers ({fitted}) than those pruned "
                          f"({ {k: list(v) for k, v in plan.items()} })")
    fold(pruned, repair, kept={stack: [i for i in range(num_layers(model, stack)) if i + 1 not in set(removed)]
                               for stack, removed in plan.items() if removed})
