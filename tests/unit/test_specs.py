import pytest

from choline_core.errors import BadSpec
from choline_core.specs import ACCEPTED_FORMS, canonical_model, looks_like_gpu_spec, parse_gpu_spec


@pytest.mark.parametrize(
    ("text", "count", "model", "memory"),
    [
        ("4x3090", 4, "RTX 3090", None),
        ("1xA100-80GB", 1, "A100", 80),
        ("1xa100_80gb", 1, "A100", 80),
        ("2xH100", 2, "H100", None),
        ("RTX_4090", 1, "RTX 4090", None),
        ("rtx 4090", 1, "RTX 4090", None),
        ("A6000", 1, "RTX A6000", None),
        ("8xH100-80GB", 8, "H100", 80),
        ("--4x3090", 4, "RTX 3090", None),
        ("2x4090", 2, "RTX 4090", None),
        ("1xL40S", 1, "L40S", None),
    ],
)
def test_valid_specs(text: str, count: int, model: str, memory: int | None) -> None:
    spec = parse_gpu_spec(text)
    assert (spec.count, spec.model, spec.memory_gb) == (count, model, memory)
    assert not spec.is_cpu
    # the canonical string parses back to the same spec
    again = parse_gpu_spec(str(spec))
    assert (again.count, again.model, again.memory_gb) == (count, model, memory)


@pytest.mark.parametrize("text", ["cpu", "1xcpu", "CPU"])
def test_cpu_specs(text: str) -> None:
    spec = parse_gpu_spec(text)
    assert spec.is_cpu and spec.count == 0 and spec.model is None
    assert str(spec) == "1xcpu"


@pytest.mark.parametrize("text", ["", "foo", "4x3091", "1xA100-60GB", "2xcpu", "0x3090", "17xH100", "x3090", "4x"])
def test_invalid_specs_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(BadSpec) as err:
        parse_gpu_spec(text)
    line = err.value.one_line()
    assert "\n" not in line
    assert ACCEPTED_FORMS in line


def test_accepts_matches_offers() -> None:
    spec = parse_gpu_spec("2xA100-80GB")
    assert spec.accepts("A100 SXM4", 80, 2)
    assert spec.accepts("A100 PCIE", 79.6, 4)  # providers report 79.x for an 80 GB card
    assert not spec.accepts("A100 PCIE", 40, 2)
    assert not spec.accepts("A100 SXM4", 80, 1)
    assert not spec.accepts("H100 SXM", 80, 2)
    assert parse_gpu_spec("cpu").accepts("anything", 0, 0)


def test_canonical_model_and_shorthand_detection() -> None:
    assert canonical_model("NVIDIA GeForce RTX 3090") is None or canonical_model("GeForce RTX 3090") == "RTX 3090"
    assert canonical_model("H100 SXM") == "H100"
    assert canonical_model("Tesla V100") == "V100"
    assert looks_like_gpu_spec("--4x3090")
    assert looks_like_gpu_spec("--1xcpu")
    assert not looks_like_gpu_spec("--epochs")
    assert not looks_like_gpu_spec("4x3090")
