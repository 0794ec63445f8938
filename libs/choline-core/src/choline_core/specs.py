"""GPU specs as users type them: ``4x3090``, ``1xA100-80GB``, ``2xH100``, ``RTX_4090``, ``cpu``.

``parse_gpu_spec`` turns one into a ``GpuSpec`` (count, model, memory per GPU in GB) or
raises ``BadSpec`` whose message names every accepted form. Model names are canonical
(``RTX 3090``, ``A100``); providers map them onto their own catalogue names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadSpec

# canonical model -> (known memory sizes in GB, default memory in GB)
GPU_MODELS: dict[str, tuple[tuple[int, ...], int]] = {
    "RTX 2080 Ti": ((11,), 11),
    "RTX 3060": ((12,), 12),
    "RTX 3070": ((8,), 8),
    "RTX 3080": ((10, 12), 10),
    "RTX 3080 Ti": ((12,), 12),
    "RTX 3090": ((24,), 24),
    "RTX 3090 Ti": ((24,), 24),
    "RTX 4060 Ti": ((8, 16), 16),
    "RTX 4070": ((12,), 12),
    "RTX 4070 Ti": ((12,), 12),
    "RTX 4080": ((16,), 16),
    "RTX 4090": ((24,), 24),
    "RTX 5080": ((16,), 16),
    "RTX 5090": ((32,), 32),
    "RTX A4000": ((16,), 16),
    "RTX A5000": ((24,), 24),
    "RTX A6000": ((48,), 48),
    "RTX 6000 Ada": ((48,), 48),
    "RTX PRO 6000": ((96,), 96),
    "A10": ((24,), 24),
    "A40": ((48,), 48),
    "A100": ((40, 80), 40),
    "H100": ((80, 94), 80),
    "H200": ((141,), 141),
    "B200": ((180,), 180),
    "L4": ((24,), 24),
    "L40": ((48,), 48),
    "L40S": ((48,), 48),
    "T4": ((16,), 16),
    "V100": ((16, 32), 16),
    "P100": ((16,), 16),
}

# lookup key (lowercase, no separators) -> canonical model
_ALIASES: dict[str, str] = {}
for _model in GPU_MODELS:
    _key = re.sub(r"[\s_\-]", "", _model.lower())
    _ALIASES[_key] = _model
    if _key.startswith("rtx"):
        _ALIASES.setdefault(_key[3:], _model)  # "3090" -> RTX 3090, "a6000" -> RTX A6000
_ALIASES.update({"6000ada": "RTX 6000 Ada", "pro6000": "RTX PRO 6000", "teslat4": "T4", "teslav100": "V100"})

ACCEPTED_FORMS = (
    "accepted forms: COUNTxMODEL (4x3090, 2xH100), COUNTxMODEL-MEMGB (1xA100-80GB), "
    "MODEL (RTX_4090, A6000), cpu or 1xcpu"
)

_SPEC_RE = re.compile(
    r"^(?:(?P<count>\d+)\s*[x\u00d7*]\s*)?(?P<model>[a-z0-9][a-z0-9 _\-]*?)(?:[\-_ ](?P<mem>\d+)\s*g(?:b|ib)?)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class GpuSpec:
    """What a run asks for: ``count`` GPUs of ``model`` with at least ``memory_gb`` each.

    A CPU spec has ``model=None``, ``count`` GPUs = 0 and ``cpus`` boxes' worth of CPU
    (always 1 today).
    """

    count: int
    model: str | None
    memory_gb: int | None
    raw: str

    @property
    def is_cpu(self) -> bool:
        return self.model is None

    def __str__(self) -> str:
        if self.is_cpu:
            return "1xcpu"
        mem = f"-{self.memory_gb}GB" if self.memory_gb else ""
        return f"{self.count}x{self.model.replace(' ', '_') if self.model else ''}{mem}"

    def accepts(self, model: str, memory_gb: float, count: int) -> bool:
        """Whether a machine with ``count`` x ``model`` of ``memory_gb`` each satisfies this spec."""
        if self.is_cpu:
            return True
        canonical = canonical_model(model)
        if canonical != self.model or count < self.count:
            return False
        return self.memory_gb is None or memory_gb + 0.5 >= self.memory_gb


def canonical_model(name: str) -> str | None:
    """Map a model name as anyone spells it (``RTX_3090``, ``rtx 3090``, ``3090``) to ours."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    for prefix in ("nvidia", "geforce", "tesla"):
        if key.startswith(prefix) and key[len(prefix) :] in _ALIASES:
            key = key[len(prefix) :]
    for suffix in ("sxm4", "sxm5", "sxm", "pcie", "nvl"):
        if key.endswith(suffix) and key[: -len(suffix)] in _ALIASES:
            key = key[: -len(suffix)]
    return _ALIASES.get(key)


def parse_gpu_spec(text: str) -> GpuSpec:
    """Parse a GPU spec; ``BadSpec`` names the accepted forms when it is not one."""
    raw = text
    s = text.strip().lstrip("-")
    if not s:
        raise BadSpec(f"empty GPU spec; {ACCEPTED_FORMS}")
    m = _SPEC_RE.match(s)
    if not m:
        raise BadSpec(f"cannot read GPU spec {raw!r}; {ACCEPTED_FORMS}")
    count = int(m["count"]) if m["count"] else 1
    model_text, mem_text = m["model"], m["mem"]
    if model_text.lower() == "cpu":
        if mem_text or count != 1:
            raise BadSpec(f"GPU spec {raw!r}: a CPU box is written 'cpu' or '1xcpu'; {ACCEPTED_FORMS}")
        return GpuSpec(count=0, model=None, memory_gb=None, raw=raw)
    model = canonical_model(model_text)
    if model is None:
        known = ", ".join(sorted({m.replace(" ", "_") for m in GPU_MODELS}))
        raise BadSpec(f"unknown GPU model {model_text!r} in {raw!r}; {ACCEPTED_FORMS}; known models: {known}")
    if not 1 <= count <= 16:
        raise BadSpec(f"GPU spec {raw!r}: count must be 1 to 16; {ACCEPTED_FORMS}")
    memory = int(mem_text) if mem_text else None
    sizes, _default = GPU_MODELS[model]
    if memory is not None and memory not in sizes:
        options = " or ".join(f"{s}GB" for s in sizes)
        raise BadSpec(f"GPU spec {raw!r}: {model} comes with {options}; {ACCEPTED_FORMS}")
    return GpuSpec(count=count, model=model, memory_gb=memory, raw=raw)


def looks_like_gpu_spec(arg: str) -> bool:
    """Whether a CLI argument such as ``--4x3090`` is meant as a GPU shorthand."""
    if not arg.startswith("--"):
        return False
    try:
        parse_gpu_spec(arg[2:])
    except BadSpec:
        return False
    return True
