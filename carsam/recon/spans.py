"""SAM's decoder transformer as an ordered list of named steps, and spans of steps as modules.

`TwoWayTransformer.forward` is a prologue followed by steps that each update a `DecoderState`
(queries `(B, Nq, E)`, keys `(B, Nk, E)`, and their positional encodings, which never change):

- prologue: image_embedding and image_pe `(B, C, H, W)` -> `(B, HW, C)`; queries = query_pe =
  point_embedding `(B, Nq, E)`, keys = the flattened image embedding, key_pe = the flattened image_pe;
- per layer i (a `TwoWayAttentionBlock`): `layers.i.self_attn` (+ norm1; layer 0's
  `skip_first_layer_pe`: no positional encoding and no residual), `layers.i.cross_attn_token_to_image`
  (+ norm2), `layers.i.mlp` (+ norm3), `layers.i.cross_attn_image_to_token` (+ norm4, updates the keys);
- `final_attn_token_to_image` (+ norm_final_attn).

A step's name is the path of its attention or MLP inside the transformer. Each step repeats the exact
tensor ops of segment_anything's forward, so running the prologue and every step is bit-identical to
`TwoWayTransformer.forward`, with `Attention` or carsam's `QuantDecoderAttention` (same call signature).
A `DecoderSpan` holds (by reference: parameters and quantizers are the model's) the modules of a
contiguous run of steps and runs them: the JCAR reconstruction units `pair` and `chain`
(`carsam.recon.units`). Steps are rebuilt from the transformer on every call, so they always hold the
modules the model holds now (after `quantize_` or AdaRound swaps).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, cast

from segment_anything.modeling import transformer as sam_transformer
from torch import Tensor, nn

from carsam.models.architecture import two_way_transformers

PROLOGUE = "prologue"
STEP_KINDS = ("self_attn", "token_to_image", "mlp", "image_to_token")
TRANSFORMER_INPUTS = ("image_embedding", "image_pe", "point_embedding")


class DecoderState(NamedTuple):
    """The transformer's state between two steps. queries, query_pe `(B, Nq, E)`; keys, key_pe `(B, Nk, E)`."""

    queries: Tensor
    keys: Tensor
    query_pe: Tensor
    key_pe: Tensor


def prologue(image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> DecoderState:
    """The state before the first step: image `(B, C, H, W)` -> keys `(B, HW, C)`; queries = point_embedding."""
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    return DecoderState(point_embedding, keys, point_embedding, key_pe)


def transformer_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(image_embedding, image_pe, point_embedding) from a `TwoWayTransformer` call's args and kwargs."""
    values = list(args) + [kwargs[name] for name in TRANSFORMER_INPUTS[len(args):]]
    if len(values) != len(TRANSFORMER_INPUTS):
        raise ValueError(f"a TwoWayTransformer call takes {TRANSFORMER_INPUTS}, got {len(values)} values")
    return values[0], values[1], values[2]


class DecoderStep(nn.Module):
    """One step: an attention or MLP (`op`), its residual add and its LayerNorm (`norm`), held by reference.

    kind: `self_attn` (queries attend to queries; `skip_pe`: layer 0's rule, no PE and no residual),
    `token_to_image` (queries attend to keys), `mlp` (on the queries), `image_to_token` (keys attend to
    queries, updates the keys). name: the op's path inside the transformer (`layers.0.mlp`).
    """

    def __init__(self, name: str, kind: str, op: nn.Module, norm: nn.Module, skip_pe: bool = False) -> None:
        super().__init__()
        if kind not in STEP_KINDS:
            raise ValueError(f"step kind must be one of {STEP_KINDS}, got '{kind}'")
        self.name, self.kind, self.skip_pe = name, kind, skip_pe
        self.op, self.norm = op, norm
        self.training = op.training

    def forward(self, state: DecoderState) -> DecoderState:
        """The state after this step (same shapes as `state`)."""
        if self.kind == "self_attn":
            return self._self_attn(state)
        if self.kind == "mlp":
            return state._replace(queries=self.norm(state.queries + self.op(state.queries)))
        q = state.queries + state.query_pe
        k = state.keys + state.key_pe
        if self.kind == "token_to_image":
            return state._replace(queries=self.norm(state.queries + self.op(q=q, k=k, v=state.keys)))
        return state._replace(keys=self.norm(state.keys + self.op(q=k, k=q, v=state.queries)))

    def _self_attn(self, state: DecoderState) -> DecoderState:
        queries = state.queries
        if self.skip_pe:
            return state._replace(queries=self.norm(self.op(q=queries, k=queries, v=queries)))
        q = queries + state.query_pe
        return state._replace(queries=self.norm(queries + self.op(q=q, k=q, v=queries)))

    def extra_repr(self) -> str:
        return f"name={self.name}, kind={self.kind}" + (", skip_pe=True" if self.skip_pe else "")


def _check_transformer(module: nn.Module) -> sam_transformer.TwoWayTransformer:
    if not isinstance(module, two_way_transformers()):
        raise TypeError(f"expected a TwoWayTransformer, got {type(module).__name__}")
    return module


def block_steps(block: sam_transformer.TwoWayAttentionBlock, prefix: str) -> list[DecoderStep]:
    """The four steps of one `TwoWayAttentionBlock` in call order, named `{prefix}.{op}`."""
    return [DecoderStep(f"{prefix}.self_attn", "self_attn", block.self_attn, block.norm1, block.skip_first_layer_pe),
            DecoderStep(f"{prefix}.cross_attn_token_to_image", "token_to_image", block.cross_attn_token_to_image,
                        block.norm2),
            DecoderStep(f"{prefix}.mlp", "mlp", block.mlp, block.norm3),
            DecoderStep(f"{prefix}.cross_attn_image_to_token", "image_to_token", block.cross_attn_image_to_token,
                        block.norm4)]


def layer_steps(transformer: nn.Module) -> list[list[DecoderStep]]:
    """Per layer of `transformer` (a `TwoWayTransformer`), its four steps in call order."""
    layers = _check_transformer(transformer).layers
    return [block_steps(block, f"layers.{i}") for i, block in enumerate(layers)]


def final_step(transformer: nn.Module) -> DecoderStep:
    """The last step: the final token->image attention and `norm_final_attn`."""
    t = _check_transformer(transformer)
    return DecoderStep("final_attn_token_to_image", "token_to_image", t.final_attn_token_to_image, t.norm_final_attn)


def decoder_steps(transformer: nn.Module) -> list[DecoderStep]:
    """Every step of `transformer`, in call order (4 per layer, then the final attention)."""
    return [step for layer in layer_steps(transformer) for step in layer] + [final_step(transformer)]


def step_names(transformer: nn.Module) -> list[str]:
    """The names of `decoder_steps(transformer)`, in call order."""
    return [step.name for step in decoder_steps(transformer)]


def trace(transformer: nn.Module, image_embedding: Tensor, image_pe: Tensor,
          point_embedding: Tensor) -> Iterator[tuple[str, DecoderState]]:
    """Yield `(PROLOGUE, state)`, then `(name, state after the step)` for every step, lazily.

    Inputs as `TwoWayTransformer.forward`'s: image_embedding, image_pe `(B, C, H, W)`, point_embedding
    `(B, Nq, C)`. The last state's (queries, keys) equal the forward's output bit for bit.
    """
    state = prologue(image_embedding, image_pe, point_embedding)
    yield PROLOGUE, state
    for step in decoder_steps(transformer):
        state = step(state)
        yield step.name, state


def run_steps(transformer: nn.Module, image_embedding: Tensor, image_pe: Tensor,
              point_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """(queries `(B, Nq, E)`, keys `(B, HW, E)`): the prologue and every step, as the transformer's forward."""
    *_, (_, state) = trace(transformer, image_embedding, image_pe, point_embedding)
    return state.queries, state.keys


def span_states(transformer: nn.Module, names: Sequence[str], image_embedding: Tensor, image_pe: Tensor,
                point_embedding: Tensor, *, end: bool = True) -> tuple[DecoderState, DecoderState | None]:
    """The state before the span `names` (a contiguous run of steps) and, if `end`, the state after it.

    Runs only as many steps as needed (none after the span; none of the span when `end` is False).
    """
    first = check_span(transformer, names)
    steps = decoder_steps(transformer)
    start = run_from(steps[:first], prologue(image_embedding, image_pe, point_embedding))
    return start, run_from(steps[first:first + len(names)], start) if end else None


def run_from(steps: Iterable[nn.Module], state: DecoderState) -> DecoderState:
    """The state after running `steps` (`DecoderStep`s) in order from `state`."""
    for step in steps:
        state = step(state)
    return state


def check_span(transformer: nn.Module, names: Sequence[str]) -> int:
    """Index of `names[0]` among the steps; raises `ValueError` unless `names` is a contiguous run of steps."""
    all_names = step_names(transformer)
    if not names or names[0] not in all_names:
        raise ValueError(f"span {list(names)} does not start with a step of the transformer; steps: {all_names}")
    first = all_names.index(names[0])
    if all_names[first:first + len(names)] != list(names):
        raise ValueError(f"span {list(names)} is not a contiguous run of the steps {all_names}")
    return first


class DecoderSpan(nn.Module):
    """A contiguous run of decoder steps as one module (its modules are the transformer's, by reference).

    Forward: queries `(B, Nq, E)`, keys `(B, Nk, E)`, query_pe `(B, Nq, E)`, key_pe `(B, Nk, E)` ->
    (queries, keys) after the last step, exactly as the transformer computes them.
    """

    def __init__(self, steps: Sequence[DecoderStep]) -> None:
        super().__init__()
        if not steps:
            raise ValueError("a DecoderSpan needs at least one step")
        self.steps = nn.ModuleList(steps)
        self.training = all(step.training for step in steps)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, names: Sequence[str]) -> DecoderSpan:
        """The span of the steps `names` (contiguous, in call order) of `transformer`."""
        first = check_span(transformer, names)
        return cls(decoder_steps(transformer)[first:first + len(names)])

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the steps it runs, in order."""
        return tuple(cast(DecoderStep, step).name for step in self.steps)  # __init__ fills it with DecoderSteps

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        state = run_from(self.steps, DecoderState(queries, keys, query_pe, key_pe))
        return state.queries, state.keys


__all__ = ["PROLOGUE", "STEP_KINDS", "DecoderSpan", "DecoderState", "DecoderStep", "block_steps", "check_span",
           "decoder_steps", "final_step", "layer_steps", "prologue", "run_from", "run_steps", "span_states",
           "step_names", "trace", "transformer_inputs"]
