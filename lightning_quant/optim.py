"""Turn an existing torch optimizer into its bitsandbytes 8-bit twin, and count optimizer-state bytes.

The twin trains the same parameters with the same param groups and hyper-parameters; only the optimizer
state changes format: tensors of at least ``min_8bit_size`` elements keep block-wise (256 values per block)
dynamically quantized uint8 state, smaller ones keep float32 state, as bitsandbytes decides.

References:
- Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (block-wise dynamic
  quantization; embeddings are the layers that need 32-bit state for stable training).
- bitsandbytes ``bitsandbytes/optim/optimizer.py`` (``Optimizer8bit.get_config``, ``GlobalOptimManager``)
  and ``bitsandbytes/backends/cpu/ops.py`` (the update rules that decide which torch options map).
- torch ``torch/optim/lr_scheduler.py`` (``initial_lr`` and the ``optimizer.step`` wrapper schedulers add).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "StateBytes",
    "embedding_parameters",
    "optimizer_state_bytes",
    "repoint_lr_schedulers",
    "to_8bit_optimizer",
]

# Fixed by bitsandbytes for 8-bit optimizer state (``Optimizer{1,2}State.init_state``).
_BLOCKSIZE = 256
# Keys that only steer torch's implementation. After validation they hold values that change nothing, and
# bitsandbytes ignores them, so they are dropped instead of lying about what the twin does.
_TORCH_ONLY_KEYS = {"amsgrad", "capturable", "centered", "decoupled_weight_decay", "differentiable"}
_TORCH_ONLY_KEYS |= {"foreach", "fused", "initial_accumulator_value", "lr_decay", "maximize", "nesterov"}
_KEEP = "or keep the 32-bit optimizer"

Group = dict[str, Any]


def _float(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _adam_like(g: Group) -> Group:
    return {"betas": tuple(_float(b) for b in g["betas"]), "eps": g["eps"]}


@dataclass(frozen=True)
class _Twin:
    """How one source optimizer class maps onto bitsandbytes."""

    name: str  # bitsandbytes class
    paged_name: str | None
    state_keys: tuple[str, ...]  # source state tensors, in bitsandbytes' state1 / state2 order
    hyper: Callable[[Group], Group]  # source group -> bitsandbytes' betas / eps
    require: Mapping[str, Any]  # group options bitsandbytes' update rule has only at these values
    consumed: frozenset[str] = frozenset()  # source keys that ``hyper`` re-expresses


def _sgd(g: Group) -> Group:
    return {"betas": (_float(g["momentum"]), _float(g["dampening"])), "eps": 0.0}


def _rmsprop(g: Group) -> Group:
    return {"betas": (_float(g["alpha"]), 0.0), "eps": g["eps"]}


def _adagrad(g: Group) -> Group:
    return {"betas": (0.0, 0.0), "eps": g["eps"]}


_ADAM = {"amsgrad": False, "maximize": False}
_SGD = {"nesterov": False, "dampening": 0, "maximize": False}
_RMSPROP = {"centered": False, "momentum": 0, "maximize": False}
_ADAGRAD = {"lr_decay": 0, "initial_accumulator_value": 0, "maximize": False}
_TWINS = {
    "Adam": _Twin("Adam8bit", "PagedAdam8bit", ("exp_avg", "exp_avg_sq"), _adam_like, _ADAM),
    "AdamW": _Twin("AdamW8bit", "PagedAdamW8bit", ("exp_avg", "exp_avg_sq"), _adam_like, _ADAM),
    "SGD": _Twin("SGD8bit", None, ("momentum_buffer",), _sgd, _SGD, frozenset({"momentum", "dampening"})),
    "RMSprop": _Twin("RMSprop8bit", None, ("square_avg",), _rmsprop, _RMSPROP, frozenset({"alpha", "momentum"})),
    "Adagrad": _Twin("Adagrad8bit", None, ("sum",), _adagrad, _ADAGRAD),
    "Lion": _Twin("Lion8bit", "PagedLion8bit", ("state1",), _adam_like, {}),
}


def _import_bitsandbytes() -> ModuleType:
    import bitsandbytes

    return bitsandbytes


def _public_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith(("torch.optim.", "bitsandbytes.optim.")):  # torch.optim.adamw -> torch.optim
        module = module.rsplit(".", 1)[0]
    return f"{module}.{cls.__qualname__}"


def _twin_of(optimizer: torch.optim.Optimizer, bnb: ModuleType) -> _Twin:
    optim = torch.optim
    by_class: dict[type, str] = {optim.Adam: "Adam", optim.AdamW: "AdamW", optim.SGD: "SGD"}
    by_class.update({optim.RMSprop: "RMSprop", optim.Adagrad: "Adagrad"})
    for lion in ("Lion", "Lion32bit", "PagedLion", "PagedLion32bit"):
        by_class[getattr(bnb.optim, lion)] = "Lion"
    cls = type(optimizer)
    args = getattr(optimizer, "args", None)
    if isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and getattr(args, "optim_bits", 32) == 8:
        raise ValueError(f"`optimizer` is already a bitsandbytes 8-bit optimizer ({cls.__name__}); use it as it is")
    if cls not in by_class:
        subclass = isinstance(optimizer, tuple(by_class))
        why = " (subclasses are rejected: they may change the update rule)" if subclass else ""
        raise ValueError(
            f"`optimizer` of type {_public_name(cls)} is not supported{why}; supported: "
            f"{', '.join(map(_public_name, by_class))}; build the bitsandbytes 8-bit optimizer yourself {_KEEP}"
        )
    return _TWINS[by_class[cls]]


def _check_group(twin: _Twin, name: str, group: Group, index: int) -> None:
    where = f"(param group {index})"
    for key, value in twin.require.items():
        if key in group and group[key] != value:
            raise ValueError(f"{name} does not support {key}={group[key]!r} {where}; set {key}={value!r} {_KEEP}")
    if twin.name == "SGD8bit" and not group["momentum"] > 0:
        raise ValueError(
            f"{name} does not support momentum={group['momentum']!r} {where}: SGD without momentum has no "
            f"state to quantize; set momentum>0 {_KEEP}"
        )
    if twin.name == "Adam8bit" and _float(group["weight_decay"]) and not group.get("decoupled_weight_decay"):
        raise ValueError(
            f"{name} does not support weight_decay={group['weight_decay']!r} as torch.optim.Adam's L2 term "
            f"{where}: bitsandbytes decays weights decoupled, as AdamW does; use torch.optim.AdamW or "
            f"Adam(decoupled_weight_decay=True), set weight_decay=0, {_KEEP}"
        )


def _translate(twin: _Twin, group: Group) -> Group:
    """Re-express a source param group in bitsandbytes' keys, keeping the user's own keys."""
    kept = {k: v for k, v in group.items() if k not in _TORCH_ONLY_KEYS and k not in twin.consumed}
    kept.update(twin.hyper(group), lr=_float(group["lr"]), weight_decay=_float(group["weight_decay"]))
    return kept


def _own_overrides(optimizer: Any, bnb: ModuleType, keep_32bit: set[int]) -> None:
    """Give ``optimizer`` its own copy of bitsandbytes' override tables, with 32-bit state for ``keep_32bit``.

    ``GlobalOptimManager`` is process-wide, keyed by ``id(param)`` and by (group, index): writing to it would
    leak the choice into every other bitsandbytes optimizer and onto new parameters that reuse a freed id.
    Optimizers read the tables through ``self.mng``; the copy keeps earlier ones (``StableEmbedding``'s).
    """
    shared = bnb.optim.GlobalOptimManager.get_instance()
    own = object.__new__(type(shared))
    own.initialize()
    own.module_weight_config_triple = shared.module_weight_config_triple
    own.uses_config_override = shared.uses_config_override
    own.index2config = {k: dict(v) for k, v in shared.index2config.items()}
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            config = dict(shared.pid2config.get(id(p), {}))
            if id(p) in keep_32bit:
                config["optim_bits"] = 32
                # bitsandbytes < 0.50 reads only the positional table.
                own.index2config.setdefault((gindex, pindex), {})["optim_bits"] = 32
            if config:
                own.pid2config[id(p)] = config
    optimizer.mng = own


def _steps_taken(state: Mapping[str, Any] | None, twin: _Twin) -> int:
    if not state or any(state.get(k) is None for k in twin.state_keys):
        return 0
    # torch SGD keeps no step count; any count > 0 gives bitsandbytes' momentum update the same result.
    return int(state.get("step", 1))


def _move_state(source: torch.optim.Optimizer, target: Any, twin: _Twin, bnb: ModuleType) -> None:
    """Copy stepped state from ``source`` into ``target``, quantizing it where ``target`` keeps 8 bits."""
    F = bnb.functional
    for gindex, group in enumerate(target.param_groups):
        for pindex, p in enumerate(group["params"]):
            old = source.state.get(p)
            steps = _steps_taken(old, twin)
            if old is None or not steps:
                continue
            if not target.initialized:  # what Optimizer8bit.step does before its first update
                target.check_overrides()
                target.to_gpu()
                target.initialized = True
            target.init_state(group, p, gindex, pindex)
            new = target.state[p]
            new["step"] = steps
            for slot, key in enumerate(twin.state_keys, start=1):
                value = old[key]
                if value.dtype == torch.uint8:  # a bitsandbytes source with a per-parameter 8-bit override
                    absmax, code = old[key.replace("state", "absmax")], old[key.replace("state", "qmap")]
                    value = F.dequantize_blockwise(value, absmax=absmax, code=code, blocksize=_BLOCKSIZE)
                buffer = new[f"state{slot}"]
                value = value.to(device=buffer.device, dtype=torch.float32)
                if buffer.dtype == torch.uint8:
                    codes, quant_state = F.quantize_blockwise(value, code=new[f"qmap{slot}"], blocksize=_BLOCKSIZE)
                    buffer.copy_(codes)
                    new[f"absmax{slot}"].copy_(quant_state.absmax)
                else:
                    buffer.copy_(value)


def to_8bit_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    paged: bool = False,
    embeddings: str = "32bit",
    min_8bit_size: int = 4096,
    embedding_params: Iterable[torch.nn.Parameter] = (),
    bits: int = 8,
) -> torch.optim.Optimizer:
    """Build the bitsandbytes 8-bit twin of ``optimizer``, with the same param groups and hyper-parameters.

    Adam -> ``Adam8bit``, AdamW -> ``AdamW8bit`` (paged: ``PagedAdam8bit``, ``PagedAdamW8bit``), SGD with
    momentum -> ``SGD8bit``, RMSprop -> ``RMSprop8bit``, Adagrad -> ``Adagrad8bit``, bitsandbytes' ``Lion``
    and ``Lion32bit`` -> ``Lion8bit`` (``PagedLion8bit``). Groups keep their order, parameters,
    hyper-parameters (SGD's ``momentum`` and RMSprop's ``alpha`` become ``betas[0]``, as bitsandbytes
    reads them) and other keys (``initial_lr``, your own); torch-only switches (``foreach``...) are dropped.
    State of an optimizer that has stepped moves over (quantized where the twin keeps 8 bits), so training
    continues rather than restarting its moments. ``optimizer`` is left untouched; hooks registered on it
    are not carried over. Re-point LR schedulers with :func:`repoint_lr_schedulers`.

    Args:
        optimizer: the torch (or bitsandbytes 32-bit Lion) optimizer to mirror.
        paged: use the paged variant (Adam, AdamW, Lion); on CPU bitsandbytes warns and uses plain memory.
        embeddings: ``"32bit"`` keeps float32 state for ``embedding_params`` (their rows see rare, large
            gradients that 8-bit state handles badly); ``"8bit"`` quantizes them like every other tensor.
        min_8bit_size: tensors with fewer elements keep float32 state (bitsandbytes' argument).
        embedding_params: parameters that ``embeddings="32bit"`` applies to, e.g.
            ``embedding_parameters(model)``; ones the optimizer does not train are ignored.
        bits: bits per state value; only 8 exists.

    Raises:
        ValueError: for ``bits`` other than 8, an unknown ``embeddings``, a negative ``min_8bit_size``, a
            class without a twin (subclasses and 8-bit optimizers included), ``paged`` without a paged twin,
            or a group option the twin would silently change (amsgrad, maximize, nesterov, dampening,
            centered, RMSprop momentum, Adagrad lr_decay / initial_accumulator_value, Adam's L2 decay).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(64, 64), torch.nn.Linear(64, 64))
        >>> adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> opt = to_8bit_optimizer(adamw, embedding_params=embedding_parameters(model))
        >>> type(opt).__name__, opt.param_groups[0]["lr"]
        ('AdamW8bit', 0.001)
    """
    if bits != 8:
        raise ValueError(f"`bits` must be 8, the only optimizer-state width bitsandbytes has; got {bits!r}")
    if embeddings not in ("32bit", "8bit"):
        raise ValueError(f"`embeddings` must be one of 32bit, 8bit; got {embeddings!r}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"`min_8bit_size` must be an int >= 0; got {min_8bit_size!r}")
    bnb = _import_bitsandbytes()
    twin = _twin_of(optimizer, bnb)
    name = twin.paged_name if paged else twin.name
    if name is None:
        raise ValueError(f"bitsandbytes has no paged variant of {twin.name}; set paged=False")
    for index, group in enumerate(optimizer.param_groups):
        _check_group(twin, name, group, index)
    groups = [_translate(twin, group) for group in optimizer.param_groups]
    # SGD8bit rejects momentum=0 in its constructor even when every group sets its own.
    extra = {"momentum": groups[0]["betas"][0]} if twin.name == "SGD8bit" else {}
    new = getattr(bnb.optim, name)(groups, lr=groups[0]["lr"], min_8bit_size=min_8bit_size, **extra)
    # `defaults` fill groups added later (add_param_group), so they too follow the source optimizer.
    new.defaults.update({k: v for k, v in _translate(twin, optimizer.defaults).items() if k in new.defaults})
    keep_32bit = {id(p) for p in embedding_params} if embeddings == "32bit" else set()
    _own_overrides(new, bnb, keep_32bit)
    _move_state(optimizer, new, twin, bnb)
    return new


def embedding_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Return the weight of every ``nn.Embedding`` or ``nn.EmbeddingBag`` (and subclass) in ``model``, once.

    Args:
        model: the model to search.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
        >>> [tuple(p.shape) for p in embedding_parameters(model)]
        [(10, 4)]
    """
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            found.setdefault(id(module.weight), module.weight)  # type: ignore[arg-type]  # tied: once
    return list(found.values())


def _walk(schedulers: Iterable[Any]) -> Iterator[Any]:
    for scheduler in schedulers:
        yield scheduler
        yield from _walk(getattr(scheduler, "_schedulers", ()))  # SequentialLR, ChainedScheduler


def _mark_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` the way torch's LR schedulers do, so their call-order checks see it."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step.__func__  # type: ignore[attr-defined]
    owner = weakref.ref(optimizer)  # the optimizer holds this wrapper: no reference cycle

    @functools.wraps(step)
    def step_and_mark(*args: Any, **kwargs: Any) -> Any:
        opt = owner()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    setattr(step_and_mark, "_wrapped_by_lr_sched", True)  # noqa: B010
    setattr(optimizer, "step", step_and_mark)  # noqa: B010


def repoint_lr_schedulers(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Make LR schedulers built on ``old`` drive ``new``, so the LR sequence continues unchanged.

    Covers every ``torch.optim.lr_scheduler`` class, the children of ``SequentialLR`` / ``ChainedScheduler``
    included; schedulers of other optimizers are left alone. Scheduler state (``last_epoch``, ``base_lrs``,
    ``_last_lr``) and the group keys they keep (``initial_lr``, ``max_lr``...), which
    :func:`to_8bit_optimizer` copies, carry on as they are. Re-done here: the ``optimizer`` reference, the
    ``step`` wrapper torch checks for call order, and whether ``OneCycleLR`` / ``CyclicLR`` cycle
    ``betas[0]`` or ``momentum``.

    Args:
        schedulers: the schedulers to re-point.
        old: the optimizer they were built on.
        new: its replacement, with the same number of param groups.

    Raises:
        ValueError: if ``old`` and ``new`` have different numbers of param groups.

    Example:
        >>> adamw = torch.optim.AdamW(torch.nn.Linear(64, 64).parameters(), lr=1e-3)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: 0.5)
        >>> opt = to_8bit_optimizer(adamw)
        >>> repoint_lr_schedulers([scheduler], adamw, opt)
        >>> scheduler.optimizer is opt, opt.param_groups[0]["lr"]
        (True, 0.0005)
    """
    if len(old.param_groups) != len(new.param_groups):
        raise ValueError(
            f"`new` has {len(new.param_groups)} param groups but `old` has {len(old.param_groups)}; "
            "schedulers keep one value per group, so build `new` from the same groups"
        )
    moved = False
    for scheduler in _walk(schedulers):
        if getattr(scheduler, "optimizer", None) is not old:
            continue
        scheduler.optimizer = new
        moved = True
        if getattr(scheduler, "cycle_momentum", False):
            # SGD8bit keeps its momentum as betas[0], where torch's SGD has `momentum`.
            scheduler.use_beta1 = "betas" in new.defaults
    if moved:
        if getattr(old, "_opt_called", False):
            new._opt_called = True  # type: ignore[attr-defined]
        _mark_step_calls(new)


@dataclass
class StateBytes:
    """Bytes held by an optimizer's state tensors.

    Args:
        total: bytes of all state tensors; a tensor shared by several parameters (bitsandbytes' code
            books) counts once.
        quantized: bytes in the states of parameters that hold 8-bit state: the uint8 codes plus the
            float32 block scales (``absmax``) and code books (``qmap``) that decode them.
        full_precision: the rest: float32 moments, step counters.
        per_parameter: bytes per parameter name; sums to ``total`` (a shared tensor is charged to the first
            parameter that holds it).
    """

    total: int
    quantized: int
    full_precision: int
    per_parameter: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-able dict."""
        return asdict(self)


def optimizer_state_bytes(
    optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str] | None = None
) -> StateBytes:
    """Count the bytes of every tensor in ``optimizer.state``, torch or bitsandbytes alike.

    Args:
        optimizer: any ``torch.optim.Optimizer``; state exists only for parameters that have stepped.
        names: parameter -> name, e.g. ``{p: n for n, p in model.named_parameters()}``; parameters it
            lacks are named ``param_groups.<group>.<index>``.

    Example:
        >>> linear = torch.nn.Linear(64, 64, bias=False)
        >>> adamw = torch.optim.AdamW(linear.parameters())
        >>> linear(torch.ones(1, 64)).sum().backward()
        >>> adamw.step()
        >>> optimizer_state_bytes(adamw, {linear.weight: "weight"}).per_parameter
        {'weight': 32772}
    """
    names = names or {}
    seen: set[int] = set()
    quantized = full_precision = 0
    per_parameter: dict[str, int] = {}
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state:
                continue
            tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if id(t) not in seen)
            seen.update(id(t) for t in tensors)
            if any(t.dtype in (torch.uint8, torch.int8) for t in tensors):
                quantized += nbytes
            else:
                full_precision += nbytes
            name = names.get(p, f"param_groups.{gindex}.{pindex}")
            per_parameter[name] = per_parameter.get(name, 0) + nbytes
    return StateBytes(quantized + full_precision, quantized, full_precision, per_parameter)
