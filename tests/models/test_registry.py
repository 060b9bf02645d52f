"""Adapter selection, and the rule that the trainer knows no model family (one interface for all)."""

import ast
import inspect
import re

import pytest

import trl_flow.trainer
from trl_flow.errors import UserInputError
from trl_flow.models import (
    ADAPTERS,
    FlowModelAdapter,
    FluxAdapter,
    QwenImageAdapter,
    SD3Adapter,
    adapter_for_pipeline,
)


def fake_pipeline(class_name: str, base: type = object):
    """An object whose class is called ``class_name`` (selection looks at class names only)."""
    return type(class_name, (base,), {})()


def test_registry_is_keyed_by_family_name():
    expected = {"sd3": SD3Adapter, "flux": FluxAdapter, "qwen_image": QwenImageAdapter}
    assert expected.items() <= ADAPTERS.items()
    for adapter_class in ADAPTERS.values():
        assert issubclass(adapter_class, FlowModelAdapter)
        assert adapter_class.pipeline_class_names
        assert adapter_class.default_lora_target_modules


@pytest.mark.parametrize(
    ("class_name", "adapter_class"),
    [
        ("StableDiffusion3Pipeline", SD3Adapter),
        ("FluxPipeline", FluxAdapter),
        ("QwenImagePipeline", QwenImageAdapter),
    ],
)
def test_selected_automatically_from_the_pipeline_class(class_name, adapter_class):
    pipeline = fake_pipeline(class_name)
    adapter = adapter_for_pipeline(pipeline)
    assert type(adapter) is adapter_class
    assert adapter.pipeline is pipeline


def test_a_subclass_of_a_supported_pipeline_is_served_by_its_family():
    flux = type("FluxPipeline", (), {})
    assert type(adapter_for_pipeline(fake_pipeline("MyTunedFluxPipeline", flux))) is FluxAdapter


def test_a_recipe_can_force_the_family():
    assert type(adapter_for_pipeline(fake_pipeline("SomeCustomPipeline"), "qwen_image")) is QwenImageAdapter
    assert type(adapter_for_pipeline(fake_pipeline("FluxPipeline"), "sd3")) is SD3Adapter


def test_unsupported_pipeline_error_lists_what_is_supported():
    with pytest.raises(UserInputError) as error:
        adapter_for_pipeline(fake_pipeline("StableDiffusionXLPipeline"))
    message = str(error.value)
    assert "StableDiffusionXLPipeline" in message
    for name in ("StableDiffusion3Pipeline", "FluxPipeline", "QwenImagePipeline", "sd3", "flux", "qwen_image"):
        assert name in message


def test_unknown_family_error_lists_the_families():
    with pytest.raises(UserInputError, match="sd3, flux, ") as error:
        adapter_for_pipeline(fake_pipeline("FluxPipeline"), "sdxl")
    assert f"(model_family: {', '.join(ADAPTERS)})" in str(error.value)  # every registered family, in order


# ------------------------------------------------------------------------------------------ one interface only
_FAMILY_WORDS = re.compile(r"flux|sd3|stable_?diffusion|qwen", re.IGNORECASE)


def _code_names_and_strings(tree: ast.AST) -> list[str]:
    """Identifiers, attribute names, imported names and string constants of the code (docstrings excluded)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.alias):
            found.extend([node.name, node.asname or ""])
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.append(node.name)
    return found


def test_trainer_has_no_model_family_branches():
    tree = ast.parse(inspect.getsource(trl_flow.trainer))
    names = _code_names_and_strings(tree)
    assert not [name for name in names if _FAMILY_WORDS.search(name)]
    # The trainer talks to adapters only through the base interface: no concrete adapter class is referenced.
    adapter_names = {cls.__name__ for cls in ADAPTERS.values()}
    assert not adapter_names & set(names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass", "type"):
            referenced = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not any("Adapter" in name for name in referenced), ast.unparse(node)
