"""Readouts: the scalar per input that patching, knockout and steering measure.

A :class:`Readout` is a callable ``readout(output, cache) -> Float[Tensor, "batch"]``: ``output`` is what the
model returned (logits ``[batch, seq, vocab]`` for VLMs; may be ``None`` after an early stop when the readout
reads only hooks), ``cache`` an :class:`~hooked_vlm.cache.ActivationCache` holding at least the hooks named in
its ``hook_names`` (empty when it reads only the output). Readouts compose with arithmetic (``a - b``,
``2 * a``, ``a / 3``) and :meth:`Readout.normalized` gives ``(r - corrupted) / (clean - corrupted)``.

- :class:`LogitDiff`: logit of the answer minus the logit of the wrong answer(s) (yes/no, multiple choice).
- :class:`TokenProbability`: probability of a target word (or a set of spellings of it).
- :class:`ClipSimilarity`: CLIP image-text cosine similarity (or softmax probability) against given texts.
- :class:`Probe`: a linear or MLP probe on any hook, including the LAION improved aesthetic predictor
  (:meth:`Probe.from_laion_aesthetic`); :func:`fit_linear_probe` fits one on cached activations.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_vlm.cache import ActivationCache
from hooked_vlm.layout import Selector

TokenLike = int | str


class Readout:
    """Base class: subclasses set ``hook_names`` and implement ``__call__(output, cache) -> [batch]``."""

    hook_names: tuple[str, ...] = ()
    #: How many final sequence positions of the logits the readout reads (``None``: all, or not logits). Runs
    #: may pass it as ``logits_to_keep`` so a large vocabulary is projected only where it is read.
    logits_to_keep: int | None = None

    def __call__(self, output: Any, cache: ActivationCache) -> Float[Tensor, " batch"]:
        raise NotImplementedError

    # ---- composition --------------------------------------------------------------------------------------------
    def __add__(self, other: Readout | float) -> Readout:
        return _Combined(operator.add, self, other, "+")

    def __radd__(self, other: float) -> Readout:
        return _Combined(operator.add, other, self, "+")

    def __sub__(self, other: Readout | float) -> Readout:
        return _Combined(operator.sub, self, other, "-")

    def __rsub__(self, other: float) -> Readout:
        return _Combined(operator.sub, other, self, "-")

    def __mul__(self, other: Readout | float) -> Readout:
        return _Combined(operator.mul, self, other, "*")

    def __rmul__(self, other: float) -> Readout:
        return _Combined(operator.mul, other, self, "*")

    def __truediv__(self, other: Readout | float) -> Readout:
        return _Combined(operator.truediv, self, other, "/")

    def __neg__(self) -> Readout:
        return _Combined(operator.mul, -1.0, self, "*")

    def normalized(self, clean: float | Tensor, corrupted: float | Tensor) -> Readout:
        """``(self - corrupted) / (clean - corrupted)``: 0 at the corrupted value, 1 at the clean one."""
        return _Normalized(self, clean, corrupted)


def normalize(
    value: Float[Tensor, "*shape"] | float, clean: Float[Tensor, "*shape"] | float, corrupted: Float[Tensor, "*shape"] | float
) -> Float[Tensor, "*shape"]:
    """``(value - corrupted) / (clean - corrupted)``: the fraction of the clean-vs-corrupted gap ``value`` restores."""
    return (torch.as_tensor(value) - corrupted) / (torch.as_tensor(clean) - corrupted)


class _Combined(Readout):
    """``op(a, b)`` where each side is a readout or a number; reads the union of both sides' hooks."""

    def __init__(self, op: Callable, a: Readout | float, b: Readout | float, symbol: str):
        self.op, self.a, self.b, self.symbol = op, a, b, symbol
        sides = [x for x in (a, b) if isinstance(x, Readout)]
        self.hook_names = tuple(dict.fromkeys(n for x in sides for n in x.hook_names))
        keeps = [x.logits_to_keep for x in sides]
        self.logits_to_keep = None if None in keeps else max(keeps)

    def __call__(self, output, cache):
        evaluate = lambda x: x(output, cache) if isinstance(x, Readout) else x  # noqa: E731
        a, b = evaluate(self.a), evaluate(self.b)
        if isinstance(a, Tensor) and isinstance(b, Tensor):  # e.g. logits and a probe on different devices
            b = b.to(a.device)
        return self.op(a, b)

    def __repr__(self) -> str:
        return f"({self.a!r} {self.symbol} {self.b!r})"


class _Normalized(Readout):
    def __init__(self, readout: Readout, clean: float | Tensor, corrupted: float | Tensor):
        self.readout, self.clean, self.corrupted = readout, clean, corrupted
        self.hook_names, self.logits_to_keep = readout.hook_names, readout.logits_to_keep

    def __call__(self, output, cache):
        return normalize(self.readout(output, cache), self.clean, self.corrupted)

    def __repr__(self) -> str:
        return f"{self.readout!r}.normalized({self.clean}, {self.corrupted})"


# ---------------------------------------------------------------------------------------------------------------
# Readouts of the LM logits.


def _upcast(x: Tensor) -> Tensor:
    """At least float32: half-precision logits and embeddings are read in float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def resolve_tokenizer(source: Any) -> Any:
    """A tokenizer from a tokenizer, a processor that holds one, or a ``HookedVLM``."""
    source = getattr(source, "processor", source)
    return getattr(source, "tokenizer", source)


def token_id(token: TokenLike, tokenizer: Any = None) -> int:
    """The vocabulary id of ``token``: an id as it is, or a word that must encode to exactly one token."""
    if isinstance(token, int):
        return token
    if tokenizer is None:
        raise ValueError(f"{token!r} is a word: pass tokenizer= (a tokenizer, processor or HookedVLM) or token ids")
    tokenizer = resolve_tokenizer(tokenizer)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{token!r} is {len(ids)} tokens ({pieces}), not one; pass a single-token spelling (often with a "
            "leading space or capitalised, e.g. ' yes' / 'Yes') or the token id"
        )
    return ids[0]


def _ids(tokens: TokenLike | Sequence[TokenLike] | Tensor, tokenizer: Any) -> Int[Tensor, "rows k"]:
    """Token ids as ``[rows, k]``: one token or a set of tokens for every prompt as ``[1, k]``; a tensor gives one
    row per prompt (``[batch]`` → ``[batch, 1]``, ``[batch, k]`` as it is)."""
    if isinstance(tokens, Tensor):
        return tokens.long().reshape(len(tokens), -1)
    if isinstance(tokens, (int, str)):
        tokens = [tokens]
    return torch.tensor([[token_id(t, tokenizer) for t in tokens]])


def _show(ids: Int[Tensor, "rows k"], tokenizer: Any = None) -> str:
    """Tokens for a repr and for figure titles, as the words they decode to when the tokenizer is known
    (``' yes'``, ``[' A', ' B']``), else as ids (``33``); per-prompt ids as ``per-prompt [batch×k]``."""
    if len(ids) > 1:
        return f"per-prompt {list(ids.shape)}" if ids.numel() > 8 else str(ids.tolist())

    def word(token: int) -> str | int:
        return token if tokenizer is None else tokenizer.decode([token])

    row = [word(int(token)) for token in ids[0]]
    return repr(row) if len(row) > 1 else repr(row[0])


def _where(position: int) -> str:
    return "last token" if position == -1 else f"position {position}"


def _per_row(ids: Int[Tensor, "rows k"], batch: int, device: torch.device) -> Int[Tensor, "batch k"]:
    return ids.to(device).expand(batch, -1)


class _LogitReadout(Readout):
    """Reads the logits at one sequence position (default -1: prompts are left-padded, so the last token)."""

    def __init__(self, position: int):
        self.position = position
        self.logits_to_keep = -position if position < 0 else None

    def logits(self, output: Any) -> Float[Tensor, "batch vocab"]:
        if not isinstance(output, Tensor) or output.dim() != 3:
            raise ValueError(
                f"{type(self).__name__} reads LM logits [batch, seq, vocab], got "
                f"{type(output).__name__ if not isinstance(output, Tensor) else tuple(output.shape)}"
            )
        return _upcast(output[:, self.position])


class LogitDiff(_LogitReadout):
    """Logit of ``correct`` minus the logit of ``incorrect`` at ``position`` (default: the last token).

    Yes/no: ``LogitDiff("Yes", "No", tokenizer=model)``. Multiple choice: ``incorrect`` a list of the other
    options, reduced by ``reduce`` (``"max"``: the strongest wrong answer, ``"mean"``, or ``"logsumexp"``).
    Per-prompt answers: ``correct`` a ``[batch]`` id tensor, ``incorrect`` ``[batch]`` or ``[batch, k]``.
    Words must be single tokens (see :func:`token_id`).
    """

    def __init__(
        self,
        correct: TokenLike | Tensor,
        incorrect: TokenLike | Sequence[TokenLike] | Tensor,
        *,
        tokenizer: Any = None,
        position: int = -1,
        reduce: str = "max",
    ):
        super().__init__(position)
        if reduce not in ("max", "mean", "logsumexp"):
            raise ValueError(f"reduce must be 'max', 'mean' or 'logsumexp', not {reduce!r}")
        self.correct, self.incorrect, self.reduce = _ids(correct, tokenizer), _ids(incorrect, tokenizer), reduce
        # kept only to print the words in reprs and figure titles
        self._tokenizer = None if tokenizer is None else resolve_tokenizer(tokenizer)
        if self.correct.shape[1] != 1:
            raise ValueError(f"LogitDiff takes one correct token per prompt, got {self.correct.shape[1]}")

    def __call__(self, output, cache=None):
        logits = self.logits(output)
        batch = logits.shape[0]
        right = logits.gather(1, _per_row(self.correct, batch, logits.device))[:, 0]
        wrong = logits.gather(1, _per_row(self.incorrect, batch, logits.device))
        if self.reduce == "max":
            wrong = wrong.amax(1)
        elif self.reduce == "mean":
            wrong = wrong.mean(1)
        else:
            wrong = wrong.logsumexp(1)
        return right - wrong

    def __repr__(self) -> str:
        wrong = _show(self.incorrect, self._tokenizer)
        if self.incorrect.shape[1] > 1:
            wrong = f"{self.reduce} of {wrong}"
        return f"LogitDiff({_show(self.correct, self._tokenizer)} vs {wrong}, {_where(self.position)})"


class TokenProbability(_LogitReadout):
    """Probability (or log-probability) of ``target`` at ``position``; a list of tokens sums their probabilities
    (e.g. ``["Yes", " yes"]``), a ``[batch]`` tensor gives one target per prompt."""

    def __init__(
        self,
        target: TokenLike | Sequence[TokenLike] | Tensor,
        *,
        tokenizer: Any = None,
        position: int = -1,
        log: bool = False,
    ):
        super().__init__(position)
        self.target, self.log = _ids(target, tokenizer), log
        self._tokenizer = None if tokenizer is None else resolve_tokenizer(tokenizer)

    def __call__(self, output, cache=None):
        log_probs = self.logits(output).log_softmax(-1)
        picked = log_probs.gather(1, _per_row(self.target, log_probs.shape[0], log_probs.device)).logsumexp(1)
        return picked if self.log else picked.exp()

    def __repr__(self) -> str:
        return f"TokenProbability({_show(self.target, self._tokenizer)}, {_where(self.position)}{', log' if self.log else ''})"


# ---------------------------------------------------------------------------------------------------------------
# CLIP.


class ClipSimilarity(Readout):
    """Cosine similarity of each image embedding (``hook_image_embeds``) with the text embedding ``target``.

    With ``softmax=True``, the probability CLIP gives ``target`` among all texts (``logit_scale · cos``, softmaxed
    over the texts), as in zero-shot classification. Build it from texts with :meth:`from_texts`; contrasts
    compose: ``ClipSimilarity.from_texts(m, t, 0) - ClipSimilarity.from_texts(m, t, 1)``.
    """

    hook_names = ("hook_image_embeds",)

    def __init__(
        self,
        text_embeds: Float[Tensor, "texts d"],
        target: int = 0,
        *,
        softmax: bool = False,
        logit_scale: float | None = None,
    ):
        if softmax and logit_scale is None:
            raise ValueError("softmax=True needs the model's logit_scale (from_texts reads it from the model)")
        self.text_embeds = nn.functional.normalize(text_embeds.detach().float(), dim=-1)
        self.target, self.softmax, self.logit_scale = target, softmax, logit_scale

    @classmethod
    def from_texts(cls, model: Any, texts: str | Sequence[str], target: int = 0, *, softmax: bool = False):
        """Embed ``texts`` with ``model``'s text tower once; ``logit_scale`` is the model's (``exp`` of its parameter)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with torch.no_grad():
            _, cache = model.run_with_cache(None, text=texts, names_filter="hook_text_embeds")
        logit_scale = float(model.raw_model.logit_scale.detach().exp())
        return cls(cache["hook_text_embeds"], target, softmax=softmax, logit_scale=logit_scale)

    def __call__(self, output, cache):
        image = nn.functional.normalize(_upcast(cache["hook_image_embeds"]), dim=-1)
        cosine = image @ self.text_embeds.to(image.device, image.dtype).T  # [batch, texts]
        if self.softmax:
            return (self.logit_scale * cosine).softmax(-1)[:, self.target]
        return cosine[:, self.target]

    def __repr__(self) -> str:
        return f"ClipSimilarity(text {self.target} of {len(self.text_embeds)}{', softmax' if self.softmax else ''})"


# ---------------------------------------------------------------------------------------------------------------
# Probes.

#: ``(position in the LAION checkpoint's nn.Sequential, dropout before the next Linear)``; layers 1/3/5 are Dropout.
_LAION_LAYERS = ((0, 0.2), (2, 0.2), (4, 0.1), (6, None), (7, None))


class _Layers(nn.Module):
    """Holds ``layers`` so a LAION state dict (keys ``layers.0.weight`` ...) loads with ``strict=True``."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Probe(Readout):
    """A linear or MLP probe (any ``nn.Module`` mapping ``[n, d] → [n, 1]``) on the hook ``hook_name``.

    ``position`` says which positions of a ``[batch, pos, d]`` hook the probe reads: an index (``0`` for CLS,
    ``-1`` for the last token) or a selector (``"patches"``, ``"image"``, a patch mask, ...) whose positions are
    averaged; ``None`` for pooled hooks (``[batch, d]``: ``hook_image_embeds``, CLIP's ``vision.hook_out``).
    ``normalize`` L2-normalises the feature before the probe (as the LAION predictor expects).
    """

    def __init__(
        self, hook_name: str, module: nn.Module, *, position: int | Selector | None = None, normalize: bool = False
    ):
        self.hook_names = (hook_name,)
        self.module = module.eval()
        self.position, self.normalize = position, normalize

    @property
    def hook_name(self) -> str:
        return self.hook_names[0]

    def features(self, cache: ActivationCache) -> Float[Tensor, "batch d"]:
        """The vector the probe reads for each batch row (position picked or averaged, normalised if asked)."""
        x = cache[self.hook_name]
        if self.position is None:
            if x.dim() != 2:
                raise ValueError(
                    f"{self.hook_name!r} is {tuple(x.shape)}, not pooled [batch, d]: give the probe a position "
                    "(an index such as 0 for CLS, or a selector such as 'patches' to average)"
                )
        elif isinstance(self.position, int):
            x = x[:, self.position]
        else:
            mask = cache.layout.mask(self.position, self.hook_name).to(x.device)
            x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        x = _upcast(x)
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def __call__(self, output, cache):
        x = self.features(cache)
        parameter = next(self.module.parameters())
        return _upcast(self.module(x.to(parameter.device, parameter.dtype)).squeeze(-1))

    @property
    def linear(self) -> bool:
        """True if the probe is affine: only Linear, Dropout and Identity layers (the LAION predictor is)."""
        return all(isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Sequential, _Layers)) for m in self.module.modules())

    def _affine(self) -> tuple[Tensor, Tensor]:
        if not self.linear:
            raise ValueError("this probe has non-linear layers, so it has no single direction")
        d = next(m for m in self.module.modules() if isinstance(m, nn.Linear)).in_features
        parameter = next(self.module.parameters())
        with torch.no_grad():
            # an affine map is determined by its value at 0 and at the unit vectors
            points = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(parameter.device, parameter.dtype)
            values = self.module(points).squeeze(-1).float()
        return values[1:] - values[0], values[0]

    @property
    def direction(self) -> Float[Tensor, " d"]:
        """The weight vector ``w`` of a linear probe (``probe = w · x + bias``); several linear layers compose."""
        return self._affine()[0]

    @property
    def bias(self) -> Float[Tensor, ""]:
        return self._affine()[1]

    @classmethod
    def from_laion_aesthetic(
        cls, path: str | PathLike, hook_name: str = "hook_image_embeds", *, map_location: str = "cpu"
    ) -> Probe:
        """The LAION improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth`` and siblings) from a file.

        The checkpoint is the state dict of its ``MLP`` class: ``layers`` = Linear(768, 1024), Dropout(0.2),
        Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1), applied to
        L2-normalised CLIP ViT-L/14 image embeddings, which is what this probe reads (``hook_image_embeds``,
        normalised). Sizes are read from the file; the model's embedding size must match the first layer.
        """
        state = torch.load(path, map_location=map_location, weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        expected = {f"layers.{i}.{p}" for i, _ in _LAION_LAYERS for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(
                f"{path} is not an improved-aesthetic-predictor state dict: expected keys {sorted(expected)}, "
                f"got {sorted(state)}"
            )
        layers: list[nn.Module] = []
        for i, dropout in _LAION_LAYERS:
            out_features, in_features = state[f"layers.{i}.weight"].shape
            layers.append(nn.Linear(in_features, out_features))
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
        module = _Layers(nn.Sequential(*layers))
        module.load_state_dict(state)
        return cls(hook_name, module, normalize=True)

    def __repr__(self) -> str:
        where = "" if self.position is None else f", position={self.position!r}"
        return f"Probe({self.hook_name!r}{where}{', normalized input' if self.normalize else ''})"


def fit_linear_probe(
    activations: Float[Tensor, "n d"],
    labels: Float[Tensor, " n"],
    hook_name: str,
    *,
    position: int | Selector | None = None,
    normalize: bool = False,
    l2: float = 1e-3,
) -> Probe:
    """Fit a linear probe ``w · x + b ≈ label`` by ridge regression (closed form) and return it as a :class:`Probe`.

    ``activations`` are the features the probe will read, e.g. ``cache["hook_image_embeds"]`` over a data set,
    or ``cache.select(name, "patches")`` means; ``position`` / ``normalize`` say how the probe picks them from a
    cache later (``normalize`` is applied here too, before fitting). ``l2`` is the ridge penalty relative to the
    mean feature variance; the bias is not penalised.
    """
    if activations.dim() != 2 or labels.shape != activations.shape[:1]:
        raise ValueError(f"need activations [n, d] and labels [n], got {tuple(activations.shape)} and {tuple(labels.shape)}")
    x = activations.detach().double()
    if normalize:
        x = nn.functional.normalize(x, dim=-1)
    y = labels.detach().double().to(x.device)
    x_mean, y_mean = x.mean(0), y.mean()
    xc = x - x_mean
    penalty = l2 * xc.pow(2).mean() * len(x)
    weight = torch.linalg.solve(xc.T @ xc + penalty * torch.eye(x.shape[1], dtype=x.dtype, device=x.device), xc.T @ (y - y_mean))
    linear = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        linear.weight.copy_(weight[None])
        linear.bias.copy_(y_mean - x_mean @ weight)
    return Probe(hook_name, linear.to(activations.device), position=position, normalize=normalize)
