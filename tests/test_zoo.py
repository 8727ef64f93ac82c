"""The model zoo and its artifacts (pure torch, no NATS)."""

from __future__ import annotations

import pytest
import torch

from shared.errors import BadRequest
from zoo import ModelSpec, build_model
from zoo.artifacts import checkpoint_from_bytes, checkpoint_to_bytes, weights_from_bytes, weights_to_bytes
from zoo.classifier import cnn, mlp
from zoo.limits import MAX_PARAMETERS
from zoo.lm import block_parameters, causal_lm


def test_factories_resolve_by_import_path_and_fail_clearly() -> None:
    model = build_model(ModelSpec(factory="zoo.classifier:cnn", kwargs={"side": 8, "classes": 10}))
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    with pytest.raises(BadRequest, match=r"must look like package\.module:function"):
        build_model(ModelSpec(factory="zoo.classifier.mlp"))
    with pytest.raises(BadRequest, match="has no callable 'nope'"):
        build_model(ModelSpec(factory="zoo.classifier:nope"))
    with pytest.raises(BadRequest, match=r"returned list, not a torch\.nn\.Module"):
        build_model(ModelSpec(factory="zoo.devices:device_stats"))
    with pytest.raises(BadRequest, match=r"cannot import zoo\.nowhere"):
        build_model(ModelSpec(factory="zoo.nowhere:f"))


def test_zoo_models_refuse_sizes_past_the_limits_before_allocating() -> None:
    """Sizes come from the network: each model class checks them, and the whole model's parameter
    count, before a single weight is allocated (a 10^12-parameter MLP fails at once, not by OOM)."""
    cases = [
        ("zoo.classifier:mlp", {"inputs": 10**6, "classes": 10, "hidden": [10**6]}, "would have 1,000,011,000,010"),
        ("zoo.classifier:mlp", {"inputs": 4, "classes": 2, "hidden": [1] * 300}, "at most 256 widths"),
        ("zoo.classifier:mlp", {"inputs": 4.0, "classes": 2}, "inputs must be an integer, got float"),
        ("zoo.classifier:mlp", {"inputs": 4, "classes": 2, "dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
        ("zoo.classifier:cnn", {"side": 8, "classes": 10, "channels": 10**5}, "more than the zoo's limit"),
        ("zoo.lm:causal_lm", {"dim": 4096, "layers": 256}, "more than the zoo's limit of 500,000,000"),
        ("zoo.lm:causal_lm", {"layers": 10**6}, "layers must be between 1 and 256"),
        ("zoo.lm:causal_lm", {"dim": 30, "heads": 4}, r"heads \(4\) must divide dim \(30\)"),
        ("zoo.lm:Embed", {"vocab": 10**6, "dim": 10**6, "context": 1}, "this embedding would have"),
        ("zoo.lm:Block", {"dim": 10**5, "heads": 1, "dropout": 0.0}, "this block would have"),
        ("zoo.lm:Head", {"dim": 10**5, "vocab": 10**5}, "this head would have"),
    ]
    for factory, kwargs, message in cases:
        with pytest.raises(BadRequest, match=message):
            build_model(ModelSpec(factory=factory, kwargs=kwargs))


def test_parameter_counts_the_limits_use_are_exact() -> None:
    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    lm = causal_lm(vocab=11, dim=8, layers=3, heads=2, context=5)
    assert count(lm) == (11 + 5) * 8 + 3 * block_parameters(8) + (8 + 1) * 11 + 2 * 8
    assert count(mlp(inputs=7, classes=3, hidden=[5, 6])) == 7 * 5 + 5 + 5 * 6 + 6 + 6 * 3 + 3
    assert count(cnn(side=8, classes=10, channels=4)) == (9 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 4 * 10 + 10)
    # A model near the limit (454M parameters) builds on the meta device, which allocates nothing.
    big = build_model(ModelSpec(factory="zoo.lm:causal_lm", kwargs={"dim": 1024, "layers": 36}), device="meta")
    assert count(big) <= MAX_PARAMETERS and next(big.parameters()).is_meta


def test_pipeline_stages_compose_to_the_full_model() -> None:
    torch.manual_seed(0)
    model = causal_lm(dim=32, layers=4, heads=2, context=16)
    x = torch.randint(0, 257, (2, 16))
    out = x
    for stage in model.stages(3):
        out = stage(out)
    torch.testing.assert_close(out, model(x))
    with pytest.raises(ValueError, match="cannot cut 4 blocks into 5"):
        model.stages(5)


def test_generate_is_greedy_at_temperature_zero_and_samples_within_top_k() -> None:
    torch.manual_seed(0)
    model = causal_lm(dim=32, layers=1, heads=2, context=8).eval()
    prompt = torch.tensor([[104, 105]])
    greedy = list(model.generate(prompt, 12, temperature=0))
    assert greedy == list(model.generate(prompt, 12, temperature=0)) and len(greedy) == 12
    logits = model(prompt)[:, -1, :]
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    gen = torch.Generator().manual_seed(1)
    first = [next(iter(model.generate(prompt, 1, temperature=1.0, top_k=3, generator=gen))) for _ in range(20)]
    assert set(first) <= allowed
    nucleus = list(model.generate(prompt, 5, top_p=0.5, generator=gen))
    assert all(0 <= t < 257 for t in nucleus)


def test_weights_and_checkpoints_round_trip_through_safetensors() -> None:
    torch.manual_seed(0)
    model = mlp(inputs=4, classes=3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    restored = mlp(inputs=4, classes=3)
    restored.load_state_dict(weights_from_bytes(weights_to_bytes(model.state_dict())))
    torch.testing.assert_close(restored(torch.ones(1, 4)), model(torch.ones(1, 4)))
    state, opt_state, position = checkpoint_from_bytes(checkpoint_to_bytes(model.state_dict(), opt, {"epoch": 2}))
    torch.testing.assert_close(state["1.weight"], model.state_dict()["1.weight"])
    opt2 = torch.optim.Adam(restored.parameters())
    opt2.load_state_dict(opt_state)
    assert position == {"epoch": 2} and int(opt2.state_dict()["state"][0]["step"]) == 1
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
