"""Splicing sae_lens SAEs into a :class:`~hooked_vlm.HookedVLM` (the ``HookedSAETransformer`` API).

Part of the core (``HookedVLM`` inherits :class:`SAEHooksMixin`) and importing nothing from sae_lens: an SAE is
whatever object is passed in (``cfg.d_in``, ``encode``, ``decode``, its hook points), so ``import hooked_vlm``
stays free of the optional ``sae`` extra. ``hooked_vlm.sae.splice`` re-exports these names.

An SAE spliced at its hook point (``sae.cfg.metadata.hook_name``) replaces the value there with its
reconstruction in every forward until it is removed. With the error term, what the SAE fails to reconstruct is
added back, so the model's output is unchanged until a feature is edited. The SAE's own hook points appear as
children of the hook point (``vision.blocks.3.hook_resid_post.hook_sae_acts_post``): they can be cached and
hooked like any other, e.g. to clamp a feature.

Mechanics: the hook point's tap runs whenever an SAE is spliced there (``BoundHookPoint.set_splice``), even with
no hooks attached, and the hook point's forward is the :class:`SplicedSAE`; its own hooks therefore see the
value that goes on downstream (after the SAE). Models with nothing spliced run the stock forward.

A transcoder (sae_lens's ``Transcoder`` / ``SkipTranscoder``: ``cfg.metadata.hook_name`` in,
``cfg.metadata.hook_name_out`` out) replaces the value at its output hook with what it computes from the value
at its input hook in the same forward (:class:`SplicedTranscoder`); its hook points are children of the output
hook, as in sae_lens's ``HookedSAETransformer``. It reads the input hook's value as the model computed it, before
hooks attached at that same hook point run (hooks at earlier hook points do reach it).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.cache import HEAD_HOOKS, PATTERN_HOOKS, leaf
from hooked_vlm.layout import Selector
from hooked_vlm.names import canonical_hook_name
from hooked_vlm.taps import BoundHookPoint

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_vlm.model import HookedVLM


class SAEShapeError(ValueError):
    """An SAE whose ``d_in`` does not fit the activations of the hook it is spliced at."""


def flattens_heads(sae: SAE, hook_name: str) -> bool:
    """Whether ``[.., head, d_head]`` activations at ``hook_name`` are flattened before ``sae`` reads them (sae_lens
    reshapes them itself only for hook_z SAEs, ``reshape_activations="hook_z"``)."""
    return leaf(hook_name) in HEAD_HOOKS and sae.cfg.reshape_activations != "hook_z"


def encode_at(sae: SAE, hook_name: str, x: Tensor) -> Float[Tensor, "... d_sae"]:
    """Feature activations of ``sae`` for activations ``x`` of ``hook_name`` (any leading axes)."""
    return sae.encode((x.flatten(-2) if flattens_heads(sae, hook_name) else x).to(sae.device))


@contextmanager
def _hooks_disabled(sae: SAE) -> Iterator[None]:
    """``sae``'s hook points replaced by identities for the block, so a clean pass ignores feature edits (what
    HookedSAETransformer does for the error term, without sae_lens's private ``_disable_hooks``)."""
    names = list(sae.hook_dict)
    hook_points = {name: sae._modules[name] for name in names}
    try:
        for name in names:
            sae._modules[name] = nn.Identity()
        yield
    finally:
        sae._modules.update(hook_points)


class SplicedSAE(nn.Module):
    """What runs at a hook point with an SAE spliced in: encode → (the SAE's hook points) → decode.

    The SAE is kept out of ``_modules`` (as ``HookedSAETransformer``'s wrapper does), and its hook points are
    registered here, so that they are named ``<hook>.hook_sae_acts_post`` and not ``<hook>.sae.hook_…``.
    The output is cast back to the model's dtype and device, so a float32 SAE runs in a bf16 model.
    """

    def __init__(
        self,
        sae: SAE,
        hook_name: str,
        model: HookedVLM,
        use_error_term: bool = False,
        positions: Selector | None = None,
    ):
        super().__init__()
        self.__dict__["sae"] = sae
        self.__dict__["_model"] = model  # for the layout of the run in progress; not a child (that would be a cycle)
        for name, hook_point in sae.hook_dict.items():
            setattr(self, name, hook_point)
        self.hook_name = hook_name
        self.input_name = hook_name  # the hook it reads (a transcoder's differs)
        self.use_error_term = use_error_term
        self.positions = positions
        self.flatten_heads = flattens_heads(sae, hook_name)

    def forward(self, x: Tensor) -> Tensor:
        out = self._replacement(x)
        mask = self._position_mask(x)
        return out if mask is None else torch.where(mask.view(*mask.shape, *[1] * (x.dim() - 2)), out, x)

    def _replacement(self, x: Tensor) -> Tensor:
        """What goes on downstream in place of ``x`` (everywhere; positions are applied by ``forward``)."""
        sae = self.sae
        width = x.shape[-2] * x.shape[-1] if leaf(self.hook_name) in HEAD_HOOKS else x.shape[-1]
        if width != sae.cfg.d_in:
            raise SAEShapeError(
                f"the SAE spliced at {self.hook_name!r} has d_in={sae.cfg.d_in}, but the activations there have shape "
                f"{tuple(x.shape)} (width {width}); was it trained on another hook or model?"
            )
        sae_in = (x.flatten(-2) if self.flatten_heads else x).to(sae.device)
        out = sae.decode(sae.encode(sae_in))
        if self.use_error_term:
            with torch.no_grad(), _hooks_disabled(sae):  # the error of the unedited SAE, so edits show downstream
                clean = sae.decode(sae.encode(sae_in))
            out = out + sae.hook_sae_error(sae_in.to(clean.dtype) - clean)
        out = sae.hook_sae_output(out).to(device=x.device, dtype=x.dtype)
        return out.view_as(x) if self.flatten_heads else out

    def _position_mask(self, x: Tensor) -> Tensor | None:
        """``[batch, pos]``: where the SAE's output replaces the activation (``None``: everywhere)."""
        if self.positions is None:
            return None
        prepared = self._model.current_inputs
        if prepared is None or x.dim() < 3:
            raise ValueError(
                f"the SAE at {self.hook_name!r} was spliced with sae_positions={self.positions!r}, which needs a "
                "[batch, pos, ...] activation inside a HookedVLM run"
            )
        mask = prepared.layout.mask(self.positions, self.hook_name).to(x.device)
        if mask.shape == x.shape[:2]:
            return mask
        if mask.shape[0] == x.shape[0]:  # a generation step past the prompt: the new tokens are text
            return torch.full(x.shape[:2], generated_tokens_selected(self.positions), dtype=torch.bool, device=x.device)
        raise ValueError(
            f"the positions of {self.hook_name!r} {tuple(x.shape[:2])} do not match its layout {tuple(mask.shape)}"
        )

    def extra_repr(self) -> str:
        cfg = self.sae.cfg
        return (
            f"{type(self.sae).__name__}(d_in={cfg.d_in}, d_sae={cfg.d_sae}), use_error_term={self.use_error_term}, "
            f"positions={self.positions!r}"
        )


class TranscoderInput(nn.Module):
    """Spliced at a transcoder's input hook: keeps this forward's value there for the transcoder at the output
    hook, and passes it on unchanged."""

    def __init__(self, hook_name: str):
        super().__init__()
        self.hook_name = hook_name
        self.__dict__["value"] = None

    def forward(self, x: Tensor) -> Tensor:
        self.__dict__["value"] = x
        return x

    def take(self, output_hook: str) -> Tensor:
        value, self.__dict__["value"] = self.__dict__["value"], None
        if value is None:
            raise RuntimeError(
                f"the transcoder spliced at {output_hook!r} reads {self.hook_name!r}, which has not run before it in "
                "this forward: its input hook must come before its output hook"
            )
        return value


class SplicedTranscoder(SplicedSAE):
    """A transcoder at its output hook: the value there is replaced by ``transcoder(value at the input hook)``
    (plus, with the error term, what the unedited transcoder misses of the model's own value)."""

    def __init__(
        self, sae: SAE, input_point: BoundHookPoint, output_name: str, model: HookedVLM, use_error_term: bool = False,
        positions: Selector | None = None,
    ):
        super().__init__(sae, output_name, model, use_error_term=use_error_term, positions=positions)
        self.input_name = input_point.name
        self.flatten_heads = False
        self.__dict__["input_point"] = input_point
        self.__dict__["captured"] = TranscoderInput(input_point.name)

    def _replacement(self, x: Tensor) -> Tensor:
        sae = self.sae
        sae_in = self.captured.take(self.hook_name)
        if sae_in.shape[-1] != sae.cfg.d_in or x.shape[-1] != sae.cfg.d_out or sae_in.shape[:-1] != x.shape[:-1]:
            raise SAEShapeError(
                f"the transcoder {self.input_name!r} → {self.hook_name!r} maps width {sae.cfg.d_in} to {sae.cfg.d_out}, "
                f"but the activations there have shapes {tuple(sae_in.shape)} and {tuple(x.shape)}"
            )
        sae_in = sae_in.to(sae.device)
        out = sae(sae_in)  # the class's own forward: decode(encode(x)), plus the skip connection of a SkipTranscoder
        if self.use_error_term:
            with torch.no_grad(), _hooks_disabled(sae):
                clean = sae(sae_in)
            out = out + sae.hook_sae_error(x.to(device=clean.device, dtype=clean.dtype) - clean)
        return sae.hook_sae_output(out).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{self.input_name} → {self.hook_name}, " + super().extra_repr()


def output_hook_name(sae: SAE) -> str | None:
    """Where an SAE's output goes: its hook, or a transcoder's output hook (``cfg.metadata.hook_name_out``)."""
    return sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name


class SAEHooksMixin:
    """``add_sae`` / ``reset_saes`` / ``run_with_saes`` / ... for :class:`~hooked_vlm.HookedVLM`.

    Names and signatures follow sae_lens's ``HookedSAETransformer``; ``sae_positions`` (a position selector:
    ``"patches"``, ``"image"``, ...) limits where the SAE's output replaces the activation.
    """

    def add_sae(
        self: HookedVLM,
        sae: SAE,
        use_error_term: bool = False,
        sae_positions: Selector | None = None,
        hook_name: str | None = None,
    ) -> None:
        """Splice ``sae`` in at its hook point (``sae.cfg.metadata.hook_name``, or ``hook_name``).

        With ``use_error_term`` the reconstruction error is added back (the output is unchanged until a feature is
        edited through ``<hook>.hook_sae_acts_post``). With ``sae_positions``, only those positions take the
        SAE's output (its features are still computed everywhere). An SAE already at that hook point is replaced.
        """
        with self._run_guard.held():
            self._add_sae(sae, use_error_term, sae_positions, hook_name)

    def _add_sae(
        self: HookedVLM, sae: SAE, use_error_term: bool, sae_positions: Selector | None, hook_name: str | None
    ):
        metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
        if not hasattr(sae, "encode") or not hasattr(getattr(sae, "cfg", None), "d_in"):
            raise TypeError(
                f"add_sae takes a sae_lens SAE (with cfg.d_in, encode and decode), got {type(sae).__name__}"
            )
        own_name = getattr(metadata, "hook_name", None)
        name = hook_name or own_name
        if not name:
            raise ValueError("the SAE has no cfg.metadata.hook_name; pass add_sae(sae, hook_name=...)")
        name_out = getattr(metadata, "hook_name_out", None)
        if name_out and name_out != name:
            self._add_transcoder(sae, name, name_out, use_error_term, sae_positions)
            return
        hook_point = self.hook_point(name)  # unknown names raise here, with the closest valid names
        if not isinstance(hook_point, BoundHookPoint):
            raise ValueError(f"{name!r} is a hook point of a spliced SAE; an SAE goes on a hook point of the model")
        if leaf(name) in PATTERN_HOOKS:
            raise ValueError(
                f"cannot splice an SAE at {name!r}: attention scores and patterns are not per-position vectors"
            )
        width = self.hook_width(name)
        if width is not None and width != sae.cfg.d_in:
            raise SAEShapeError(
                f"cannot splice the SAE at {name!r}: the SAE has d_in={sae.cfg.d_in}, but {name!r} carries vectors "
                f"of width {width} in this model; was it trained on another hook or model (its metadata says hook "
                f"{own_name!r}, model {getattr(metadata, 'model_name', None)!r})?"
            )
        if own_name and hook_name and _as_canonical(own_name, tower=hook_name.split(".")[0]) != hook_name:
            warnings.warn(
                f"splicing the SAE at {hook_name!r}, but its metadata says it was trained at {own_name!r}; pass the "
                "hook it was trained on, or set sae.cfg.metadata.hook_name if the names mean the same",
                stacklevel=3,
            )
        if hook_point.splice is not None:
            warnings.warn(f"an SAE was already spliced at {name!r}; replacing it", stacklevel=3)
            self._unsplice(hook_point)
        hook_point.set_splice(SplicedSAE(sae, name, self, use_error_term=use_error_term, positions=sae_positions))
        self.setup()

    def _add_transcoder(
        self: HookedVLM, sae: SAE, name: str, name_out: str, use_error_term: bool, sae_positions: Selector | None
    ) -> None:
        points = [self.hook_point(name), self.hook_point(name_out)]  # unknown names raise here
        for point, width, what in zip(points, (sae.cfg.d_in, getattr(sae.cfg, "d_out", None)), ("d_in", "d_out"),
                                      strict=True):
            if not isinstance(point, BoundHookPoint) or leaf(point.name) in PATTERN_HOOKS + HEAD_HOOKS:
                raise ValueError(f"a transcoder reads and writes [.., d] vectors of the model, not {point.name!r}")
            expected = self.hook_width(point.name)
            if expected is not None and expected != width:
                raise SAEShapeError(f"the transcoder has {what}={width}, but {point.name!r} carries vectors of width "
                                    f"{expected} in this model")
        source, target = points
        if target.splice is not None:
            warnings.warn(f"an SAE was already spliced at {name_out!r}; replacing it", stacklevel=3)
            self._unsplice(target)
        if source.splice is not None:
            raise ValueError(f"an SAE is spliced at {name!r}, which the transcoder reads; remove it first (reset_saes)")
        spliced = SplicedTranscoder(sae, source, name_out, self, use_error_term=use_error_term, positions=sae_positions)
        self._set_splice(target, spliced)
        self.setup()

    @staticmethod
    def _set_splice(hook_point: BoundHookPoint, splice: SplicedSAE | None) -> None:
        """Splice (or, with ``None``, nothing) at ``hook_point``; a transcoder's input capture goes with it."""
        hook_point.set_splice(splice)
        if isinstance(splice, SplicedTranscoder):
            splice.input_point.set_splice(splice.captured)

    def _unsplice(self: HookedVLM, hook_point: BoundHookPoint) -> None:
        splice = hook_point.splice
        hook_point.set_splice(None)
        if isinstance(splice, SplicedTranscoder):
            splice.input_point.set_splice(None)
        splice.sae.setup()  # give the SAE's hook points back their own names

    def reset_saes(self: HookedVLM, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs spliced at ``act_names`` (all of them by default)."""
        names = [act_names] if isinstance(act_names, str) else act_names
        with self._run_guard.held():
            spliced = self._spliced()
            missing = [name for name in names or () if name not in spliced]
            if missing:  # before anything is removed
                raise KeyError(f"no SAE is spliced at {missing[0]!r} (spliced: {sorted(spliced)})")
            for name in names if names is not None else list(spliced):
                self._unsplice(spliced[name])
            self.setup()

    def _spliced(self: HookedVLM) -> dict[str, BoundHookPoint]:
        """The hook name each spliced SAE reads (a transcoder's input hook) → the hook point it is spliced at."""
        return {
            hp.splice.input_name: hp
            for hp in self.hook_dict.values()
            if isinstance(hp, BoundHookPoint) and isinstance(hp.splice, SplicedSAE)
        }

    @property
    def acts_to_saes(self: HookedVLM) -> dict[str, SAE]:
        """Hook name → the SAE spliced there (a transcoder under its input hook, as in sae_lens)."""
        return {name: hp.splice.sae for name, hp in self._spliced().items()}

    @staticmethod
    def get_sae_hook_name(sae: SAE, internal: str = "hook_sae_acts_post") -> str:
        """The full name of one of the SAE's hook points once spliced: ``<hook>.hook_sae_acts_post`` (a transcoder's
        are under its output hook)."""
        return f"{output_hook_name(sae)}.{internal}"

    @contextmanager
    def saes(
        self: HookedVLM,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        sae_positions: Selector | None = None,
    ) -> Iterator[HookedVLM]:
        """Splice ``saes`` for the duration of the block; on exit, what was spliced at those hook points before
        comes back (with ``reset_saes_end``)."""
        saes = [saes] if not isinstance(saes, (list, tuple)) else list(saes)
        previous: dict[str, Any] = {}
        with self._run_guard.held():  # held across the block: another thread's run would see these SAEs
            try:
                for sae in saes:
                    hook_point = self.hook_point(output_hook_name(sae) or "")
                    previous.setdefault(hook_point.name, hook_point.splice)
                    if hook_point.splice is not None:
                        self._unsplice(hook_point)
                    self.add_sae(sae, use_error_term=use_error_term, sae_positions=sae_positions)
                yield self
            finally:
                if reset_saes_end:
                    for name, splice in previous.items():
                        hook_point = self.hook_point(name)
                        if hook_point.splice is not None:
                            self._unsplice(hook_point)
                        self._set_splice(hook_point, splice)
                    self.setup()

    def run_with_saes(
        self: HookedVLM,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        sae_positions: Selector | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """The model's output with ``saes`` spliced in for this run."""
        with self.saes(saes, reset_saes_end, use_error_term, sae_positions):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self: HookedVLM,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        sae_positions: Selector | None = None,
        **run_with_cache_kwargs: Any,
    ) -> tuple[Any, Any]:
        """:meth:`run_with_cache` with ``saes`` spliced in; the cache holds the SAEs' hook points too."""
        with self.saes(saes, reset_saes_end, use_error_term, sae_positions):
            return self.run_with_cache(*model_args, **run_with_cache_kwargs)

    def run_with_hooks_with_saes(
        self: HookedVLM,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        sae_positions: Selector | None = None,
        fwd_hooks: Sequence = (),
        bwd_hooks: Sequence = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """:meth:`run_with_hooks` with ``saes`` spliced in (hooks may sit on the SAEs' hook points)."""
        with self.saes(saes, reset_saes_end, use_error_term, sae_positions):
            return self.run_with_hooks(
                *model_args,
                fwd_hooks=list(fwd_hooks),
                bwd_hooks=list(bwd_hooks),
                reset_hooks_end=reset_hooks_end,
                clear_contexts=clear_contexts,
                **model_kwargs,
            )


def _as_canonical(hook_name: str, tower: str) -> str:
    """An SAE's own hook name in hooked_vlm's names (a TransformerLens-style ``blocks.9.hook_mlp_out`` as
    ``{tower}.blocks.9.hook_mlp_out``); a name that maps onto none is kept as it is."""
    try:
        return canonical_hook_name(hook_name, tower)
    except ValueError:
        return hook_name


def generated_tokens_selected(positions: Selector) -> bool:
    """Whether a selector picks the tokens a VLM generates past its prompt: text tokens, no image patch."""
    return isinstance(positions, str) and positions in ("all", "text")
