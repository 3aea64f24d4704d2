"""Input statistics of targeted Linear layers, gathered with forward pre-hooks.

Everything accumulates in float32 with an explicit token count, whatever the model dtype (a
bf16 accumulator silently loses the small channels). The Gram matrix X X^T is only kept for
methods that need it (SparseGPT, the ``dit`` method's error-guided search).

- **Shared statistics.** Layers that read the same tensor (q/k/v of one attention, FLUX single
  blocks' ``proj_mlp`` beside them) share one :class:`InputStats`: sharing is found on the first
  batch by tensor identity and checked on every later one.
- **Padding.** Layers that read encoder tokens (PixArt's and Sana's cross-attention keys and
  values) skip the tokens that the block's ``encoder_attention_mask`` removes.
- **Held-out tokens.** While a layer has seen fewer than ``HOLDOUT_BELOW`` tokens per input,
  about one token in ``HOLDOUT_EVERY`` also goes into a held-out Gram matrix, so that a method
  can judge what it fitted on the other tokens; the held-out matrix is freed once the layer has
  enough tokens. Which tokens are held out is decided by a hash of each token's content
  (:func:`held_out`), never by arrival order: a token is held out whichever process, batch or
  position it comes in, so N processes on shards hold out what one process on their union does.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from . import memory
from .errors import InputError

__all__ = ["InputStats", "NonFiniteActivationError", "HookOwner", "observe", "token_weight", "HOLDOUT_BELOW",
           "HOLDOUT_EVERY", "held_out"]

HOLDOUT_BELOW = 16  # tokens per input below which held-out statistics are kept
HOLDOUT_EVERY = 4  # about one token in 4 is held out
_PRIME = 2147483647  # 2^31 - 1


@functools.lru_cache(maxsize=64)
def _coefficients(n: int, device: torch.device) -> torch.Tensor:
    """The hash's fixed coefficients for ``n`` inputs (made once per width and device: the hash
    runs on every calibration batch)."""
    g = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, _PRIME, (n,), generator=g, dtype=torch.int64).to(device)


def held_out(x: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the tokens of ``x`` (T, in), float32, that are held out, about one in
    ``HOLDOUT_EVERY``, by a seeded linear hash of each token's sign, exponent and 3 leading
    mantissa bits (so a last-bit difference between two processes' arithmetic moves a token
    about once in 2^20 values)."""
    bits = (x.contiguous().view(torch.int32) >> 20).to(torch.int64)  # in [-2048, 2048)
    h = torch.remainder((bits * _coefficients(x.shape[1], x.device)).sum(1), _PRIME)  # < 2^55 before the mod
    for _ in range(2):  # Lehmer steps mix the low bits
        h = torch.remainder(h * 48271, _PRIME)
    return torch.remainder(h >> 8, HOLDOUT_EVERY) == HOLDOUT_EVERY - 1


_WEIGHT = contextvars.ContextVar("ditprune_token_weight", default=1.0)


@contextmanager
def token_weight(weight: float) -> Iterator[None]:
    """Tokens observed inside the block count ``weight`` times in every statistic (e.g. a
    timestep-dependent weight of the calibration batch being run)."""
    reset = _WEIGHT.set(float(weight))
    try:
        yield
    finally:
        _WEIGHT.reset(reset)


class NonFiniteActivationError(InputError):
    """A calibration activation entering a targeted layer was NaN or infinite."""


class InputStats:
    """Running first/second-order statistics of the inputs x (shape (..., in_features)) of one
    layer (or several layers reading the same tensor).

    ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j over N tokens;
    ``gram`` is X X^T / N (only when ``need_gram``). :meth:`holdout` gives the fit and held-out
    Gram matrices of a layer that saw few tokens.
    """

    def __init__(self, name: str, in_features: int, need_gram: bool, device=None):
        with memory.region("statistics"):
            self._allocate(name, in_features, need_gram, device)

    def _allocate(self, name: str, in_features: int, need_gram: bool, device) -> None:
        self.name = name
        self.count = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram_sum = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if need_gram else None
        )
        self.held_sum = torch.zeros_like(self.gram_sum) if need_gram else None
        self.held_count = 0
        self.weight_sum = 0.0  # sum of token weights (= count unless weighted, see token_weight)
        self.held_weight = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` (..., in); ``valid`` (x.shape[:-1], bool) drops the others."""
        with memory.region("statistics"):
            self._update(x, valid)

    def _update(self, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        if valid is not None:
            x = x[valid.to(x.device)]
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        held = held_out(x) if self.held_sum is not None else None
        weight = _WEIGHT.get()
        if weight != 1.0:
            x = x * weight**0.5  # every second-order statistic scales by the weight
        sq = x.pow(2).sum(0)
        if not torch.isfinite(sq).all():
            raise NonFiniteActivationError(
                f"non-finite activation (NaN or inf) entering layer '{self.name}' during calibration; "
                "check the calibration inputs and the model's dtype (fp16 overflows are a common cause)"
            )
        self.sq_sum += sq.to(self.sq_sum.device)
        if self.gram_sum is not None:
            self.gram_sum += (x.T @ x).to(self.gram_sum.device)
            if self.held_sum is not None:
                held = x[held]
                self.held_sum += (held.T @ held).to(self.held_sum.device)
                self.held_count += held.shape[0]
                self.held_weight += weight * held.shape[0]
        self.count += x.shape[0]
        self.weight_sum += weight * x.shape[0]
        if self.held_sum is not None and self.count >= HOLDOUT_BELOW * self.sq_sum.numel():
            self.held_sum = None  # enough tokens: nothing to hold out

    def _checked_count(self) -> int:
        if self.count == 0:
            raise InputError(
                f"layer '{self.name}' saw no calibration tokens: the calibration iterable was empty, every "
                "token was padding, or the layer was never reached"
            )
        return self.count

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.sq_sum, self.gram_sum, self.held_sum) if t is not None)

    @property
    def energy(self) -> torch.Tensor:
        self._checked_count()
        return self.sq_sum / self.weight_sum

    @property
    def gram(self) -> torch.Tensor:
        if self.gram_sum is None:
            raise RuntimeError(f"layer '{self.name}': the Gram matrix was not gathered (need_gram=False)")
        self._checked_count()
        return self.gram_sum / self.weight_sum

    @property
    def few_tokens(self) -> bool:
        """Fewer than ``HOLDOUT_BELOW`` tokens per input: what is fitted on them must be judged on
        held-out tokens."""
        return self.held_sum is not None

    def holdout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(H of the fit tokens, H of the held-out tokens) of a layer with :attr:`few_tokens`;
        None when it has enough tokens, or none held out, or none left to fit on."""
        if self.held_sum is None or self.held_count == 0 or self.held_count == self.count:
            return None
        fit = (self.gram_sum - self.held_sum) / (self.weight_sum - self.held_weight)
        return fit, self.held_sum / self.held_weight


class HookOwner:
    """The one owner of every hook ditprune registers: ``remove()`` takes them all off."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookOwner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _valid_tokens(mask) -> torch.Tensor | None:
    """(B, L) bool of the encoder tokens an attention mask keeps: a 0/1 keep mask, or the additive
    bias diffusers makes of it (0 kept, a large negative number dropped), possibly (B, 1, L)."""
    if not isinstance(mask, torch.Tensor):
        return None
    m = mask.reshape(mask.shape[0], -1) if mask.dim() == 3 and mask.shape[1] == 1 else mask
    if m.dim() != 2:
        return None
    if m.dtype == torch.bool:
        return m
    return m > -1 if bool((m < 0).any()) else (m > 0.5 if bool((m > 0).any()) else torch.ones_like(m, dtype=torch.bool))


class _Observer:
    """Owns the statistics of one ``observe`` and the bookkeeping of shared inputs and padding."""

    def __init__(self, layers: dict[str, nn.Module], need_gram: bool, text_layers: set[str], share: bool = True):
        self.layers, self.need_gram, self.text_layers, self.share = layers, need_gram, text_layers, share
        self.stats: dict[str, InputStats] = {}
        self.owner: dict[str, str] = {}  # layer -> the layer whose statistics it shares
        self.seen: dict[str, tuple[weakref.ref, int]] = {}  # owner layer -> its latest input
        self.valid: torch.Tensor | None = None
        self.calls = 0

    def block_hook(self, signature: inspect.Signature):
        def hook(_module, args, kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = kwargs
            self.valid = _valid_tokens(bound.get("encoder_attention_mask"))

        return hook

    def layer_hook(self, name: str):
        def hook(_module, args):
            x = args[0]
            if name not in self.stats:
                self._first(name, x)
                return
            owner = self.owner.get(name, name)
            if owner != name:
                ref, version = self.seen.get(owner, (lambda: None, -1))
                if ref() is not x or x._version != version:
                    raise RuntimeError(
                        f"'{name}' read the same tensor as '{owner}' in the first calibration batch but not in a "
                        "later one; this model's data flow changes between calls"
                    )
                return
            self._update(name, x)

        return hook

    def _first(self, name: str, x: torch.Tensor) -> None:
        for owner, (ref, version) in (self.seen.items() if self.share else ()):
            if ref() is x and x._version == version and (owner in self.text_layers) == (name in self.text_layers):
                self.stats[name] = self.stats[owner]
                self.owner[name] = owner
                return
        module = self.layers[name]
        weight = getattr(module, "parametrizations", None)
        device = (weight.weight.original if weight is not None and "weight" in weight else module.weight).device
        self.stats[name] = InputStats(name, module.in_features, self.need_gram, device=device)
        self._update(name, x)

    def _update(self, name: str, x: torch.Tensor) -> None:
        valid = self.valid if name in self.text_layers else None
        if valid is not None and tuple(valid.shape) != tuple(x.shape[:-1]):
            valid = None
        self.stats[name].update(x, valid)
        self.seen[name] = (weakref.ref(x), x._version)


@contextmanager
def observe(layers: dict[str, nn.Module], need_gram: bool, scopes: Iterable[nn.Module] = (),
            text_layers: Iterable[str] = (), share: bool = True) -> Iterator[dict[str, InputStats]]:
    """Attach statistics pre-hooks to ``layers`` for the duration of the ``with`` block.

    ``scopes`` are the modules (transformer blocks) whose ``encoder_attention_mask`` argument
    tells which encoder tokens are padding; ``text_layers`` are the layers that read encoder
    tokens. Layers reading one tensor share one :class:`InputStats` (the yielded dict maps every
    layer to its statistics; shared ones are the same object); ``share=False`` turns that off.
    """
    obs = _Observer(layers, need_gram, set(text_layers), share)
    with HookOwner() as hooks:
        for scope in scopes:
            hooks.add(scope.register_forward_pre_hook(obs.block_hook(inspect.signature(scope.forward)),
                                                      with_kwargs=True))
        for name, module in layers.items():
            hooks.add(module.register_forward_pre_hook(obs.layer_hook(name)))
        yield obs.stats
