"""LoRA students (peft): adapters on the teacher's own transformer, one copy of the base weights.

With `train.student.kind: lora` the student IS the teacher's transformer with peft LoRA adapters injected
(diffusers' `add_adapter`, i.e. `peft.inject_adapter_in_model`; Hu et al. 2021: W x + (alpha / r) B A x with
B = 0 at init, so the student starts as the teacher). The teacher is the same modules with the adapters
disabled (`adapters_off`: peft's `enable_adapters(False)` on every tuner layer, what PeftModel's
`disable_adapter` context does), and the discriminator's frozen teacher blocks are those modules too
(pipeline/methods/discriminator.py). Only adapter parameters, plus modules a method adds around the
transformer (AYF's gap embedding), train, are averaged by the EMA, checkpointed and exported.

Threads: the batch loader's thread and workers (pipeline/loader.py) only draw rows and never run the
transformer (`Method.draw`); the teacher solves run in `Method.complete`, on the step's thread. Every adapter
toggle and every training step still holds BASE_LOCK, so any other thread of the process that calls the shared
modules (another trainer on the same teacher) never sees them half-switched (re-entrant: the teacher and
discriminator calls inside a step run on the step's thread).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

import torch

from pipeline.errors import UserError

BASE_LOCK = threading.RLock()
ADAPTER = "default"                       # peft's adapter name (diffusers' add_adapter default)
_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def tuner_layers(module: torch.nn.Module) -> list:
    """peft's tuner layers (LoRA-wrapped Linear) inside `module`, cached per module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module not in _LAYERS:
        _LAYERS[module] = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    return _LAYERS[module]


@contextlib.contextmanager
def _set_each(items, read, write, value):
    """`write(item, value)` for every item inside; each item's own `read(item)` written back after."""
    items = list(items)
    before = [read(item) for item in items]
    for item in items:
        write(item, value)
    try:
        yield
    finally:
        for item, own in zip(items, before):
            write(item, own)


def frozen(params):
    """`params` record no gradients inside; each one's requires_grad flag is restored after. (The trainer's
    generator step runs THROUGH the discriminator this way, never OF it; a method never freezes it.)"""
    return _set_each(params, lambda p: p.requires_grad, lambda p, flag: p.requires_grad_(flag), False)


@contextlib.contextmanager
def adapters_off(*modules: torch.nn.Module):
    """Run `modules` as the frozen base: every LoRA adapter inside disabled, and restored after (with the
    adapters' requires_grad flags, which peft's toggle changes)."""
    with BASE_LOCK:
        layers = [layer for m in modules for layer in tuner_layers(m)]
        if not layers:
            yield
            return
        params = [p for layer in layers for name in layer.adapter_layer_names
                  for p in getattr(layer, name).parameters()]
        # peft's toggle sets the adapters' requires_grad flags: each one's own comes back after (outer context)
        with frozen(params), _set_each(layers, lambda layer: not layer.disable_adapters,
                                       lambda layer, on: layer.enable_adapters(on), False):
            yield


def lora_config(spec):
    """peft's LoraConfig for a schemas.config.StudentConfig."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, lora_dropout=spec.dropout,
                      init_lora_weights="gaussian", target_modules=list(spec.target_modules))


def attach_adapters(transformer: torch.nn.Module, spec, owner: Any = None) -> None:
    """Freeze `transformer` and inject fresh float32 LoRA adapters into it, in place (the base keeps its
    dtype). A teacher shared by several runs of one invocation (stages/train.py SharedTeacher) holds one
    student's adapters at a time: an earlier run's are removed, and `owns` tells that trainer it lost them."""
    with BASE_LOCK:
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        transformer.__dict__["_flowsteer_lora_owner"] = weakref.ref(owner) if owner is not None else None
        _attach(transformer, spec)


def detach_adapters(transformer: torch.nn.Module, owner: Any) -> None:
    """Remove `owner`'s adapters from `transformer` (nothing when another trainer's replaced them)."""
    with BASE_LOCK:
        if owns(transformer, owner):
            transformer.unload_lora()
            transformer.__dict__["_flowsteer_lora_owner"] = None
            _LAYERS.clear()


def owns(transformer: torch.nn.Module, owner: Any) -> bool:
    """Whether `owner`'s adapters are the ones attached to `transformer` (see attach_adapters)."""
    ref = transformer.__dict__.get("_flowsteer_lora_owner")
    return ref is not None and ref() is owner


def _attach(transformer: torch.nn.Module, spec) -> None:
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(lora_config(spec), adapter_name=ADAPTER)
    except ValueError as exc:             # peft: a target module name that matches nothing
        raise UserError(f"train.student.target_modules: {str(exc).splitlines()[0][:200]}") from None
    _LAYERS.clear()
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def build_student(method, teacher, spec, device: torch.device, owner: Any = None) -> torch.nn.Module:
    """The method's trainable student: a float32 copy of the teacher (full), or the teacher's own transformer
    with adapters (lora) inside the method's wrapper (Method.wrap_student)."""
    if spec.kind == "full":
        return method.make_student(teacher.transformer).float().to(device)
    base = teacher.transformer
    attach_adapters(base, spec, owner)
    student = method.wrap_student(base)
    if student is not base:               # what the method adds around the base trains in full, float32
        for module in student.children():
            if module is not base:
                module.float().requires_grad_(True)
    return student.to(device).train()


class SharedBaseTeacher:
    """The teacher whose transformer carries the student's adapters: every call runs with them off.
    Other attributes (sample_shape, transformer, encode, ...) are the wrapped teacher's."""

    def __init__(self, teacher):
        self.inner = teacher

    def __getattr__(self, name):
        if name == "inner":               # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def velocity(self, x, sigma, cond):
        with adapters_off(self.inner.transformer):
            return self.inner.velocity(x, sigma, cond)

    def weak_velocity(self, x, sigma, cond):
        with BASE_LOCK:                   # its own network, but the step may be using the hooks it shares
            return self.inner.weak_velocity(x, sigma, cond)


def trainable_names(student: torch.nn.Module) -> list[str]:
    """The trainable parameters' names, read once when the student is built: peft's adapter toggle flips
    requires_grad while the teacher runs, so it is no record of what trains."""
    return [n for n, p in student.named_parameters() if p.requires_grad]


def trainable_state(student: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint keeps of the student: its trainable parameters (adapters, method modules)."""
    params = dict(student.named_parameters())
    return {n: params[n].detach() for n in names}


def load_trainable_state(student: torch.nn.Module, state: dict[str, torch.Tensor], names: list[str]) -> None:
    params = dict(student.named_parameters())
    wanted = set(names)
    if set(state) != wanted:
        diff = sorted(set(state) ^ wanted)
        raise UserError(f"checkpoint's LoRA parameters do not match train.student (first difference: {diff[0]}); "
                        f"move the train directory away to start again")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def lora_host(student: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside the student that holds the adapters (the student, or AYF's `.transformer`)."""
    inner = getattr(student, "transformer", None)
    return inner if isinstance(inner, torch.nn.Module) else student


def adapter_state_dict(student: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's adapter state dict (get_peft_model_state_dict: names without the adapter name) with the values
    of `weights` (e.g. the EMA shadow, keyed by the student's parameter names) in place of the live ones."""
    from peft import get_peft_model_state_dict

    host = lora_host(student)
    params = dict(student.named_parameters())
    with BASE_LOCK, torch.no_grad():
        live = {n: params[n].detach().clone() for n in weights if n in params}
        try:
            for n in live:
                params[n].copy_(weights[n])
            sd = {k: v.detach().to("cpu", torch.float32, copy=True)
                  for k, v in get_peft_model_state_dict(host, adapter_name=ADAPTER).items()}
        finally:
            for n, t in live.items():
                params[n].copy_(t)
    return sd


def adapter_metadata(student: torch.nn.Module) -> dict[str, Any]:
    """The LoraConfig as a dict (rank, alpha, targets), saved beside the weights so a loader uses the same scale."""
    return lora_host(student).peft_config[ADAPTER].to_dict()


def merged_copy(student: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A plain (adapter-free) copy of the student: its adapters, with `weights` when given, fused into the base
    (W + (alpha / r) B A)."""
    import copy

    with BASE_LOCK:
        net = copy.deepcopy(student)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, t in (weights or {}).items():
            params[n].copy_(t)
    host = lora_host(net)
    if tuner_layers(host):
        host.enable_adapters()
        host.fuse_lora(lora_scale=1.0)
        host.unload_lora()
    _LAYERS.pop(host, None)
    return net.float().eval().requires_grad_(False)


def footprint(student: torch.nn.Module, names: list[str], optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, int]:
    """Trainable and frozen parameter counts of the student and its optimiser state's bytes (after a step)."""
    params = dict(student.named_parameters())
    trainable = sum(params[n].numel() for n in names)
    frozen = sum(p.numel() for p in params.values()) - trainable
    opt_bytes = 0
    if optimizer is not None:
        opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t))
    return {"trainable_params": trainable, "frozen_params": frozen, "optimizer_bytes": opt_bytes}
