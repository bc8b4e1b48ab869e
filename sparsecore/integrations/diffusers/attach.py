"""``apply()``: check the arguments, then route a diffusers transformer's self-attention through sparsecore.

It builds the :class:`~.handle.SparseAttentionHandle`, puts a sparse processor (:mod:`.processors`) on every
self-attention module and registers the forward hooks that track steps; ``handle.remove()`` undoes all of it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import diffusers
import torch

from sparsecore.methods import SESSIONS, sta
from sparsecore.methods.contract import check_num_steps, shown
from sparsecore.registry import checked_options, device_name, device_type, registered_backends

from . import parallel
from .handle import SparseAttentionHandle
from .models import ModelSpec, spec_of
from .callable_session import MethodProvider
from .processors import SPARSE_PROCESSORS, RefusesCopies, SparseProcessor, set_processor

TESTED_DIFFUSERS = "0.42"
DENSE_ATTENTION = ("auto", "model")


def apply(transformer: Any, method: str | MethodProvider = "lvsa", device: str = "cuda", backend: str | None = None,
          num_steps: int = 50, backend_options: dict[str, Any] | None = None, dense_attention: str = "auto",
          **params: Any) -> SparseAttentionHandle:
    """Route the self-attention of every block of ``transformer`` through sparsecore.

    Args:
        transformer: a diffusers 0.42 ``WanTransformer3DModel``, ``HunyuanVideo15Transformer3DModel``,
            ``HunyuanVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``, ``WanVACETransformer3DModel``,
            ``WanAnimateTransformer3DModel``, ``SkyReelsV2Transformer3DModel``, ``MochiTransformer3DModel``,
            ``LTXVideoTransformer3DModel``, ``LTX2VideoTransformer3DModel``, ``Kandinsky5Transformer3DModel`` or
            ``CosmosTransformer3DModel`` (e.g. ``pipe.transformer``) with diffusers' own attention processors.
        method: ``"lvsa"``, ``"adaspa"``, ``"pasa"``, ``"radial"``, ``"sta"`` or ``"nabla"`` (Kandinsky 5's NABLA
            configurations only)
            (``params`` go to ``method.session(num_steps=num_steps, **params)``), or a callable
            ``(geometry, num_heads, step, layer) -> BlockMask``.
        device: the device the kernels are compiled for (``"cuda"``, ``"cpu"``, ``"npu"``..., or a torch.device such as
            ``pipe.device``); the model's tensors must be there when it runs (a forward on another device type raises
            ValueError at its first attention call, dense steps included).
        backend: a sparsecore backend name, or None for the preferred one per mask and inputs.
        num_steps: denoising steps per run (the pipeline's ``num_inference_steps``).
        backend_options: options of the named ``backend`` for every kernel (its options dataclass, e.g.
            ``{"key_parts": 4}`` for ``"fa4"``); needs ``backend``.
        dense_attention: what the dense steps and layers run: ``"auto"`` a dense kernel measured faster than
            torch SDPA's where one takes the inputs and the model is on diffusers' default attention backend
            (FlashAttention-4's on Hopper: :meth:`.SparseProcessor.faster_dense`), else the model's own attention;
            ``"model"``: the model's own attention (diffusers' dispatch), and AdaSpa's passes that give its search
            an LSE (which the model's attention does not return) on cuDNN or the fused Triton pass, not FA4.
        **params: the method's parameters (see docs/methods.md).

    Returns:
        A :class:`SparseAttentionHandle` (``set_step``, ``step``, ``stats``, ``timing``, ``mask``, ``remove``).

    Raises:
        TypeError: unsupported model class or processor, unknown method parameter, bad argument type.
        ValueError: unknown method, device or backend, bad values, or sparsecore already applied;
            ``UnsupportedError`` (a ValueError) for a backend that does not compile for ``device``.
        RuntimeError: ``device`` is known but nothing runs on it here (e.g. ``"cuda"`` without a GPU), as
            :func:`sparsecore.compile` says; the message names the device and what is missing.
    """
    spec = spec_of(transformer)
    num_steps = check_num_steps(num_steps)
    if isinstance(method, str):
        if method not in SESSIONS:
            raise ValueError(f"method: expected one of {sorted(SESSIONS)} or a callable (geometry, num_heads, step, "
                             f"layer) -> BlockMask, got {method!r}")
        if method == "lvsa":
            params.setdefault("reference_frames", spec.horizon(transformer.config))
        if method == "pasa":                 # PISA's dense first layer: each path's first block (Wan VACE has two)
            params.setdefault("dense_layers", spec.first_layers(transformer.config))
        if method == "nabla":
            if spec.nabla is None:
                raise ValueError(f"method: 'nabla' plans 8 x 8 tiles of a frame, and {spec.model_class.__name__} "
                                 f"orders its tokens by raster; use 'lvsa', 'adaspa' or 'pasa'")
            params = {**spec.nabla(transformer.config), **params}
        if method == "radial":               # the released Wan processor's attention sink (frame 0)
            params.setdefault("sink", spec.name.startswith("wan"))
        if method == "sta" and params.get("mask_strategy") is not None:    # a file read once, not per geometry
            params["mask_strategy"] = strategy = sta.read_strategy(params["mask_strategy"])
            heads = getattr(transformer.config, "num_attention_heads", None)
            if isinstance(heads, int) and heads != strategy.heads:
                raise ValueError(f"mask_strategy: expected windows for the model's {heads} heads, got {strategy.heads} "
                                 f"a layer; pass a strategy written for this model")
        session = SESSIONS[method](num_steps=num_steps, **params)                              # checks them now
        dense_layers = getattr(session.params, "dense_layers", ())     # PASA's indices, Radial's leading count
    elif callable(method):
        dense_layers = ()
        if params:
            raise TypeError(f"params: a callable method takes no parameters, got {sorted(params)}; bind them in the "
                            f"callable (functools.partial)")
    else:
        raise TypeError(f"method: expected a method name {sorted(SESSIONS)} or a callable, got "
                        f"{type(method).__name__}")
    from sparsecore.check import tensor_device_problem
    from sparsecore.registry import UnsupportedError
    device = device_name(device)                                   # a torch.device (pipe.device) as its string
    kind = device_type(device)
    if backend is not None and (not isinstance(backend, str) or backend not in registered_backends()):
        raise ValueError(f"backend: expected None or a registered sparsecore backend "
                         f"({', '.join(sorted(registered_backends()))}), got {backend!r}")
    devices = () if backend is None else registered_backends()[backend].capabilities.devices
    if backend is not None and kind not in devices:
        raise UnsupportedError(f"backend: {backend!r} compiles for {list(devices)}, not device {device!r}; pass "
                               f"backend=None for the device's preferred one")
    backend_options = checked_options(backend, backend_options, "backend_options")
    if not isinstance(dense_attention, str):
        raise TypeError(f"dense_attention: expected a str, 'auto' or 'model', got {type(dense_attention).__name__} "
                        f"{dense_attention!r}; pass dense_attention='auto' (the default) or 'model'")
    if dense_attention not in DENSE_ATTENTION:
        raise ValueError(f"dense_attention: expected 'auto' (a dense kernel measured faster where one takes the "
                         f"inputs) or 'model' (the model's own attention), got {dense_attention!r}")
    problem = tensor_device_problem(device, backend)   # checked now, not at the first forward
    if problem:
        raise RuntimeError(f"device: {problem}; pass the device the model runs on")
    if not diffusers.__version__.startswith(TESTED_DIFFUSERS + "."):
        warnings.warn(f"sparsecore.integrations.diffusers mirrors the attention processors of diffusers "
                      f"{TESTED_DIFFUSERS}.x; diffusers {diffusers.__version__} is installed: check outputs against "
                      f"handle.remove() (dense)", stacklevel=2)
    modules = attention_modules(transformer, spec)           # refuses sparsecore's processors, naming the block
    if any(isinstance(hook, _Hook) for hook in transformer._forward_pre_hooks.values()):   # its processors replaced
        raise ValueError("transformer: sparsecore is already applied to this model (an earlier handle's hooks are on "
                         "it, though its processors were replaced); call remove() on the earlier handle first")
    check_dense_layers(dense_layers, len(modules))
    strategy = params.get("mask_strategy") if method == "sta" else None
    if strategy is not None and strategy.layers != frozenset(range(len(modules))):   # another model's numbering
        layers = sorted(strategy.layers)
        raise ValueError(f"mask_strategy: expected windows for the model's layers 0..{len(modules) - 1}, got "
                         f"{len(layers)} layers {layers[0]}..{layers[-1]}; pass a strategy written for this model "
                         f"(handle.search_windows writes one)")
    parallel.refuse_unplanned(transformer, [module.processor for module in modules], spec)
    if getattr(transformer, "_parallel_config", None) is not None and modules and \
            getattr(modules[0].processor, "_parallel_config", None) is None:     # Mochi's: diffusers left it out
        raise ValueError(f"transformer: its context parallelism was enabled by diffusers' enable_parallelism, which "
                         f"leaves {type(modules[0].processor).__name__} without the config (its blocks would attend "
                         f"over this rank's tokens only); enable it with sparsecore.integrations.diffusers."
                         f"enable_parallelism(transformer, config), before or after apply()")
    handle = SparseAttentionHandle(transformer, spec, method, dict(params), device, backend, num_steps,
                                   backend_options, dense_attention)
    sparse_class = SPARSE_PROCESSORS[spec.name]
    for layer, module in enumerate(modules):
        original = module.processor
        handle._originals.append((weakref.ref(module), original))
        handle._processors.append(sparse_class(handle, layer, original))
        set_processor(module, handle._processors[-1])
    # Step tracking reads the timestep's value: never traced (regional compilation leaves these hooks eager
    # anyway; torch.compile of the whole transformer calls them eagerly, one graph break before its forward).
    handle._hooks = [transformer.register_forward_pre_hook(_Hook(handle._pre_forward), with_kwargs=True),
                     transformer.register_forward_hook(_Hook(handle._post_forward), always_call=True)]
    return handle


def check_dense_layers(dense_layers: int | tuple[int, ...], layers: int) -> None:
    """A method's ``dense_layers`` (the integration's layer order) against the model's ``layers``: PASA's indices
    must name its layers, Radial's count of leading dense layers must leave one sparse (else the method never runs)."""
    if isinstance(dense_layers, int) and dense_layers >= layers:
        got = dense_layers if dense_layers < 10 ** 12 else f"an int of {dense_layers.bit_length()} bits"
        raise ValueError(f"dense_layers: expected fewer than the model's {layers} self-attention layers (that many "
                         f"leading layers run dense; {layers} or more make every layer dense), got {got}; pass a "
                         f"count below {layers}, or handle.remove() for dense attention")
    if not isinstance(dense_layers, int) and dense_layers and dense_layers[-1] >= layers:
        raise ValueError(f"dense_layers: expected layers of the model's {layers} self-attention layers "
                         f"(0..{layers - 1}), got {shown(dense_layers)}; pass indices below {layers}")


class _Hook(RefusesCopies):
    """A handle's forward hook, run eagerly (``torch.compiler.disable``); copies and pickles of the model refuse it,
    naming the remedy, as the processors do."""

    def __init__(self, method: Any) -> None:
        self._method = method

    @torch.compiler.disable
    def __call__(self, *args: Any) -> Any:
        return self._method(*args)


def attention_modules(transformer: Any, spec: ModelSpec) -> list[Any]:
    """The self-attention modules of ``transformer`` whose processors sparsecore replaces, checked: diffusers' own
    processor on each (not sparsecore's already, nor another integration's)."""
    named = []
    for name in spec.blocks:
        blocks = getattr(transformer, name, None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise TypeError(f"transformer.{name}: expected the transformer blocks of a {spec.model_class.__name__} "
                            f"(a ModuleList), got {type(blocks).__name__}")
        named += [(f"{name}[{index}]", block) for index, block in enumerate(blocks)]
    if not named:
        raise ValueError(f"transformer: a {spec.model_class.__name__} with no blocks in "
                         f"{' or '.join(spec.blocks)} has no attention for sparsecore to run")
    modules = []
    for where, block in named:
        module = getattr(block, spec.attention, None)
        processor = getattr(module, "processor", None)
        if isinstance(processor, SparseProcessor) and processor._handle._removed:   # set back after remove()
            slot = f"transformer.{where}.{spec.attention}.processor"
            raise ValueError(f"{where}.{spec.attention}.processor: a processor of a removed sparsecore handle (set "
                             f"back after remove(), e.g. from transformer.attn_processors saved while sparsecore "
                             f"was applied), expected diffusers' own; put that back in each such block ({slot} = "
                             f"{slot}.original), then apply()")
        if isinstance(processor, SparseProcessor):
            message = (f"transformer: sparsecore is already applied to this model ({where}."
                       f"{spec.attention}); call remove() on the earlier handle first")
            raise ValueError(message)  # noqa: TRY004  (a state error, not a wrong type)
        if type(processor) not in spec.processor_classes:
            names = " or ".join(c.__name__ for c in spec.processor_classes)
            raise TypeError(f"{where}.{spec.attention}.processor: expected diffusers' {names}, got "
                            f"{type(processor).__name__}; sparsecore replaces only diffusers' own processor (restore "
                            f"it in each such block, e.g. transformer.{where}.{spec.attention}.processor = "
                            f"{spec.processor_class.__name__}(), or remove the other integration first)")
        if not spec.joint_text and (getattr(module, "is_cross_attention", False)
                                    or getattr(module, "add_k_proj", None) is not None):
            raise TypeError(f"{where}.{spec.attention}: expected the self-attention of a "
                            f"{spec.model_class.__name__} block, got a cross-attention module")
        modules.append(module)
    return modules
