"""Hostile arguments to ``sparsecore.integrations.diffusers.apply``: refused at the call, the model untouched.

A device that cannot run here (``"cuda"`` on a CPU host), a backend for another device
(``backend="triton", device="cpu"``), an unknown or malformed device, method, parameter or
step count must fail when ``apply`` is called, naming the argument, and leave the model's
processors as they were; nothing may wait for the first forward to fail.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import refused

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers 0.42 (pip install '.[diffusers]')")
from test_integration_diffusers import tiny_wan  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import UnsupportedError  # noqa: E402
from sparsecore.integrations import diffusers as sparse  # noqa: E402

MODEL = tiny_wan()
AVAILABLE = {d for d in sparsecore.known_devices()
             if any(d in b.capabilities.devices and b.unavailable_reason(d) is None
                    for b in sparsecore.registered_backends().values())}


def processors(model) -> list:
    return [type(block.attn1.processor) for block in model.blocks]


def refused_untouched(fields, types=(ValueError, TypeError), **kwargs):
    before = processors(MODEL)
    arguments = {"method": "lvsa", "device": "cpu", "num_steps": 10, **kwargs}
    error = refused(lambda: sparse.apply(MODEL, **arguments), fields, types=types)
    assert processors(MODEL) == before, "a refused apply() changed the model"
    return error


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=25)
@given(device=st.one_of(st.integers(), st.none(), st.lists(st.just("cpu"), min_size=1, max_size=1),
                        st.sampled_from(["gpu", "cpu:abc", "cpu:", "CPU", "", "cuda:x", "npu:-1", "cpu:0:1",
                                         "cpu:1", "reference:1"])))
def test_malformed_devices(device):
    refused_untouched("device", device=device)


def test_devices_that_cannot_run_here_fail_at_the_call_not_at_the_first_forward():
    """The issue: apply(model, device="cuda") on a CPU host was accepted and failed at the first forward."""
    for device in sorted(set(sparsecore.known_devices()) - AVAILABLE - {"reference"}):
        refused_untouched(f"device {device!r}", types=(RuntimeError,), device=device)
    if "cuda" in AVAILABLE:
        refused_untouched("device", types=(RuntimeError,), device=f"cuda:{torch.cuda.device_count()}")


@given(backend=st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=1), st.just("bogus"),
                         st.sampled_from(sorted(set(sparsecore.registered_backends()) - {"portable"}))))
def test_backends(backend):
    """The issue: backend="triton" with device="cpu" was accepted."""
    refused_untouched("backend", types=(ValueError, TypeError, UnsupportedError), backend=backend)


@given(method=st.one_of(st.sampled_from(["bogus", "LVSA", "", "dense"]), st.integers(), st.none(),
                        st.just(["lvsa"])))
def test_methods(method):
    refused_untouched("method", method=method)


@given(num_steps=st.sampled_from([0, -1, True, 1.5, "50", None]))
def test_step_counts(num_steps):
    refused_untouched("num_steps", num_steps=num_steps)


@given(param=st.sampled_from([("window", -1), ("window", 1.5), ("windw", 3), ("rotate", "yes"),
                              ("anchor_rule", "bogus"), ("sparsity_scale", float("nan"))]))
def test_method_parameters(param):
    name, value = param
    refused_untouched(name, **{name: value})


def test_callable_methods_take_no_parameters_and_transformers_must_be_supported():
    refused_untouched("params", method=lambda g, h, s, l: None, window=3)
    refused_untouched("device 'reference'", types=(RuntimeError,), device="reference")   # a model's tensors: torch

    class Pipeline:                                  # a pipeline holds the transformer apply() takes
        transformer = MODEL
    refused(lambda: sparse.apply(Pipeline(), device="cpu"), "pass pipe.transformer")
    refused(lambda: sparse.apply(torch.nn.Linear(2, 2), device="cpu"), "transformer")
    refused(lambda: sparse.apply(None, device="cpu"), "transformer")


def test_apply_twice_is_refused_and_a_valid_apply_still_works():
    handle = sparse.apply(MODEL, method="lvsa", device="cpu", num_steps=10)
    try:
        refused(lambda: sparse.apply(MODEL, method="lvsa", device="cpu", num_steps=10), "already applied")
        refused(lambda: handle.mask(len(MODEL.blocks)), "layer")       # returned None, as for "not planned yet"
    finally:
        handle.remove()


def test_processors_replaced_after_apply_are_reported_not_run_silently():
    """Processors set after apply() (``set_attn_processor``) bypass the handle: with every layer replaced the forward
    ran dense without a word (its stats empty), with some replaced the error blamed skipped blocks."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from test_integration_diffusers import forward, wan_inputs

    model = tiny_wan()
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=10)
    try:
        model.blocks[1].attn1.set_processor(WanAttnProcessor())
        with pytest.raises(ValueError, match=r"of 1 of its 2 self-attention layers \(from layer 1\) were replaced"):
            forward(model, wan_inputs(), 999.0)
        model.blocks[0].attn1.set_processor(WanAttnProcessor())
        before = handle.stats()
        with pytest.warns(RuntimeWarning, match=r"of 2 of its 2 .* call remove\(\) on the handle"):
            forward(model, wan_inputs(), 999.0)
        assert handle.stats() == before                 # no layer of this forward reached sparsecore
    finally:
        handle.remove()
    assert processors(model) == [WanAttnProcessor, WanAttnProcessor]      # remove() put the originals back


def test_a_torch_device_is_taken_as_its_string():
    """``device=pipe.device`` (a torch.device) was refused with a TypeError asking for a string."""
    model = tiny_wan()
    handle = sparse.apply(model, method="lvsa", device=torch.device("cpu"), num_steps=10)
    try:
        assert handle.device == "cpu"
    finally:
        handle.remove()


def test_processors_of_a_removed_handle_set_back_are_refused_naming_the_remedy():
    """diffusers' ``attn_processors`` saved while sparsecore was applied and set back after ``remove()`` put the removed
    handle's processors on the model: ``apply`` said "already applied; call remove() on the earlier handle first", and
    remove() (idempotent) changed nothing, so the model could not be applied again."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_wan()
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=10)
    saved = model.attn_processors
    handle.remove()
    model.set_attn_processor(saved)
    handle.remove()                                                  # what the old message asked for: no help
    refused(lambda: sparse.apply(model, method="lvsa", device="cpu", num_steps=10),
            "blocks[0].attn1.processor: a processor of a removed sparsecore handle")
    for block in model.blocks:                                       # the remedy the message names
        block.attn1.processor = block.attn1.processor.original
    assert processors(model) == [WanAttnProcessor, WanAttnProcessor]
    sparse.apply(model, method="lvsa", device="cpu", num_steps=10).remove()


def test_pasa_dense_layers_beyond_the_models_layers_are_refused():
    """PASA's ``dense_layers`` name layers in the integration's order; one past the model's last layer (a typo, or a
    list written for a deeper model) was taken and did nothing: every layer ran sparse."""
    refused_untouched("dense_layers", method="pasa", dense_layers=(0, len(MODEL.blocks)))
    refused_untouched("dense_layers", method="pasa", dense_layers=(10 ** 12,))
    handle = sparse.apply(MODEL, method="pasa", device="cpu", num_steps=10, dense_layers=(len(MODEL.blocks) - 1,))
    handle.remove()


def test_radial_dense_layers_at_or_past_the_models_layers_are_refused():
    """Radial's ``dense_layers`` (the first that many layers run dense) at or past the model's layer count made every
    layer dense without a word, the method never running; refused as PASA's layers are, by the same check."""
    layers = len(MODEL.blocks)
    for count in (layers, layers + 1, 10 ** 12):
        error = refused_untouched("dense_layers", method="radial", dense_layers=count)
        assert f"{layers} self-attention layers" in str(error) and "pass" in str(error), str(error)
    sparse.apply(MODEL, method="radial", device="cpu", num_steps=10, dense_layers=layers - 1).remove()


@pytest.mark.parametrize("method, params, field", [("radial", {"dense_steps": 10}, "dense_steps"),
                                                   ("sta", {"dense_steps": 12}, "dense_steps"),
                                                   ("pasa", {"dense_fraction": 1.0}, "dense_fraction"),
                                                   ("adaspa", {"warmup_steps": 10}, "search_steps")])
def test_leading_dense_steps_that_cover_the_run_are_refused(method, params, field):
    """A method configured so that every one of the run's steps is dense never runs: refused at apply(), the model
    untouched, as Radial's ``dense_layers`` covering every layer is (Radial, STA and PASA took it without a word)."""
    error = refused_untouched(field, method=method, **params)
    assert "num_steps=10" in str(error) and "pass" in str(error), str(error)


@pytest.mark.parametrize("value", [True, None, 1, ["auto"], np.array(["auto"]), np.array(["auto", "model"])])
def test_dense_attention_of_another_type_is_a_type_error_naming_the_field(value):
    """A NumPy array ``["auto"]`` was taken (and kept on the handle as an array), ``["auto", "model"]`` failed with
    NumPy's 'truth value of an array ... is ambiguous', and True or None were ValueErrors."""
    refused_untouched("dense_attention", types=(TypeError,), dense_attention=value)


def test_a_model_on_another_device_than_applied_for_is_named_at_its_first_forward(monkeypatch):
    """apply(device=...) for one device and the model run on another (apply(device=pipe.device) before pipe.to(...)):
    the dense steps ran, and the first sparse step failed inside the kernel ("q: tensors are on 'cpu' but the kernel
    was compiled for device 'xpu'; ... or compile for their device"), naming compile, not apply. Emulated on the CPU:
    the portable backend claims an 'xpu' here, and the model stays on the CPU."""
    from test_integration_diffusers import forward, wan_inputs

    monkeypatch.setattr(sparsecore.registered_backends()["portable"], "unavailable_reason", lambda device: None)
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="radial", device="xpu", num_steps=2, dense_steps=1, block_size=16)
    try:
        with pytest.raises(ValueError, match=r"^device: .*'cpu' tensors.*apply\(\) was given device='xpu'.*"
                                             r"transformer\.to\('xpu'\).*apply\(transformer, device='cpu'"):
            forward(model, inputs, 999.0)                    # step 0: a dense step
        assert handle.stats() == []                          # refused before any attention ran
    finally:
        handle.remove()
    handle = sparse.apply(model, method="radial", device="cpu", num_steps=2, dense_steps=1, block_size=16)
    try:                                                     # the remedy runs both steps
        for timestep in (999.0, 500.0):
            assert torch.isfinite(forward(model, inputs, timestep)).all()
        assert [row["action"] for row in handle.stats()][-1] == "plan"
    finally:
        handle.remove()


def test_refused_removes_a_handle_it_was_wrongly_given_and_names_the_call():
    """``refused`` left a handle that ``apply`` wrongly accepted on the model: every later ``apply`` of the module then
    failed as 'already applied', hiding the first failure's cause. It removes it, naming the call it was given by."""
    model = types.SimpleNamespace(handle=None)

    class Handle:
        def remove(self) -> None:
            model.handle = None

    def accepting_apply(target, **params):
        if target.handle is not None:
            raise ValueError("transformer: sparsecore is already applied to this model")
        target.handle = Handle()
        return target.handle
    arguments = {"method": "radial", "num_steps": 10, "dense_steps": 10}
    for _ in range(2):                  # the second is refused as the first was, not as 'already applied'
        with pytest.raises(AssertionError, match="accepted") as failed:
            refused(lambda: accepting_apply(model, **arguments), "dense_steps")
        assert model.handle is None, "the accepted handle was left on the model"
        message = str(failed.value)
        assert "accepting_apply(model, **arguments)" in message and "'dense_steps': 10" in message, message
    kept = [1, 2]
    with pytest.raises(AssertionError, match="accepted"):
        refused(lambda: kept, "lists")    # a remove() that takes an argument is not a handle's
    assert kept == [1, 2]
