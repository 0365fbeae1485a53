"""Parameter names per architecture: the learner's in-memory names -> the model's checkpoint names.

The learner holds a transformers model; weights leave it in two directions, both in CHECKPOINT format,
the names ``save_pretrained`` writes for that architecture:

- the Hugging Face export (``LearnerGroup.export_hf``), which transformers must load back;
- the weight push into the rollout engines, which vLLM loads exactly as it loads a checkpoint from disk
  (its model class maps checkpoint names with its own ``hf_to_vllm_mapper``).

Nothing here is written per model by hand: the mapping is what transformers itself applies when it saves
(``transformers.core_model_loading.revert_weight_conversion``, the inverse of the conversion it applied
when loading: ``model._weight_conversions``, or the registered mapping of the model type). For Qwen2.5-VL
(transformers 5) that turns ``model.language_model.*`` into ``model.*`` and ``model.visual.*`` into
``visual.*``, the layout its checkpoints have; Qwen3-VL checkpoints keep the in-memory names, so nothing
changes. A conversion that is not a one-to-one rename (fusing experts, splitting a tensor) has no
per-parameter name; :func:`checkpoint_names` raises naming the parameter rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NamingError", "checkpoint_names", "load_names"]


class NamingError(ValueError):
    """A parameter has no checkpoint name the libraries define; the message names it."""


def checkpoint_names(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{in-memory name: checkpoint name}`` for ``names`` (default: every ``state_dict`` key of ``model``), in
    that order.

    ``model`` is the transformers model (plain or FSDP2-wrapped: ``fully_shard`` keeps names and attributes).
    Each name goes through transformers' own save-time conversion with a placeholder tensor of its own, so
    where every placeholder lands is the rename; a placeholder that comes back merged, split or not at all
    is a conversion this function cannot express per parameter (:class:`NamingError`).
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = list(model.state_dict() if names is None else names)
    placeholders = {n: torch.empty(0) for n in names}
    owner = {id(t): n for n, t in placeholders.items()}
    try:
        reverted = revert_weight_conversion(model, dict(placeholders))
    except Exception as exc:  # a converter that needs real tensors (concatenation, splitting)
        raise NamingError(
            f"{type(model).__name__}: transformers' save-time weight conversion is not a per-parameter rename "
            f"({type(exc).__name__}: {exc}); this model's weights cannot be named for the engines or the export"
        ) from exc
    out: dict[str, str] = {}
    for new, tensor in reverted.items():
        old = owner.get(id(tensor))
        if old is None:
            raise NamingError(
                f"{type(model).__name__}: checkpoint tensor {new!r} is built from several in-memory tensors "
                "(a weight converter, not a rename); not supported for weight sync or export"
            )
        out[old] = new
    missing = [n for n in names if n not in out]
    if missing:
        raise NamingError(
            f"{type(model).__name__}: parameter {missing[0]!r} has no checkpoint name after transformers' "
            f"save-time conversion ({len(missing)} such parameters)"
        )
    if len(set(out.values())) != len(out):
        dup = sorted(v for v in out.values() if list(out.values()).count(v) > 1)[0]
        raise NamingError(f"{type(model).__name__}: several parameters map to checkpoint name {dup!r}")
    return {n: out[n] for n in names}  # in the order asked for (transformers sorts)


def load_names(model: torch.nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """``{in-memory name: checkpoint key}`` for the tensors of a checkpoint, by transformers' own LOAD-time
    conversion (the renamings ``from_pretrained`` applies, legacy layouts included, and its base-model prefix
    rule). Records the conversions that matched on ``model`` as ``from_pretrained`` does, so that
    :func:`checkpoint_names` afterwards gives back this checkpoint's own layout (for a model built with
    ``from_config``, e.g. on the meta device). A key that only a converter (not a rename) maps is refused.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        name, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is not None:
            raise NamingError(
                f"{type(model).__name__}: checkpoint tensor {key!r} is converted on load ({converted}), not renamed; "
                "set learner.sharded_init=false to load this model through transformers"
            )
        if name in out:
            raise NamingError(
                f"{type(model).__name__}: checkpoint tensors {out[name]!r} and {key!r} both load as {name!r}"
            )
        out[name] = key
    model._weight_conversions = [m for m in mapping if m.was_used()]
    return out
