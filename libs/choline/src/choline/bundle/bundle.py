"""``save_bundle`` and ``load_bundle``: a trained model as a self-describing folder and tarball.

Layout (docs/bundles.md is the contract the serving process is written against)::

    <name>/
      card.json             the card: purpose, inputs, outputs, preprocessing, model, training, metrics,
                            code, environment, files (size and sha256 of every other file)
      weights.safetensors   the model's state dict (never pickle)
      code/                 the model's source, when it is not importable from an installed package
    <name>.choline-bundle.tar.gz   the same folder, reproducibly packed
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import archive
from .card import FORMAT, build_card, check_card, read_card
from .errors import BundleError
from .preprocess import DTYPES, Preprocessing, Step

log = logging.getLogger("choline.bundle")

CARD = "card.json"
WEIGHTS = "weights.safetensors"
CODE = "code"
LOWER_IS_BETTER = ("loss", "error", "err", "perplexity", "mae", "mse", "rmse", "wer", "cer")
NOT_METRICS = ("epoch", "lr", "batch_size")


# ===================================================================================== helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{what} must be JSON values ({exc})") from None


def _installed(path: str | None) -> bool:
    """A module file that comes from an installed package or the standard library (importable anywhere)."""
    if path is None:
        return True
    p = os.path.realpath(path)
    roots = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    if any(root and p.startswith(os.path.realpath(root) + os.sep) for root in roots):
        return True
    return "site-packages" in Path(p).parts or "dist-packages" in Path(p).parts


def _factory_spec(factory: Callable[..., nn.Module]) -> tuple[str, str, Path | None]:
    """(module, qualname, source file to copy or None)."""
    qual = getattr(factory, "__qualname__", "")
    module = getattr(factory, "__module__", None)
    if not module or "<locals>" in qual or "<lambda>" in qual:
        raise BundleError(
            f"{qual or factory!r} cannot be imported again: define the model's class or builder at module level"
        )
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    if module == "__main__":
        if not file:
            raise BundleError("the model is defined in an interactive session: put it in a .py file")
        return Path(file).stem, qual, Path(file)
    if _installed(file):
        return module, qual, None
    return module, qual, Path(file) if file else None


def _required_params(factory: Callable[..., Any]) -> list[str]:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    return [
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _git(folder: Path) -> tuple[str | None, bool | None]:
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return head.stdout.strip() or None, bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def environment(extra: Iterable[str] = ()) -> dict[str, Any]:
    packages = {}
    for name in ("torch", "numpy", "safetensors", "choline", *extra):
        v = _version(name)
        if v is not None:
            packages[name] = v
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": packages,
    }


def _metrics_of(run: Any) -> dict[str, Any]:
    """``{"final": {key: value}, "best": {key: {"value", "step", "mode"}}}`` from the run's history."""
    final = {k: v for k, v in run.summary.items() if _is_metric(k)}
    best: dict[str, Any] = {}
    try:
        from choline.train.metrics import history

        points = history(run.dir)
    except Exception:  # a run on another rank or without files
        points = []
    for p in points:
        key, value = p["key"], p["value"]
        if not _is_metric(key) or not isinstance(value, (int, float)) or value != value:
            continue
        lower = any(w in key.lower().rsplit("/", 1)[-1] for w in LOWER_IS_BETTER)
        cur = best.get(key)
        if cur is None or (value < cur["value"] if lower else value > cur["value"]):
            best[key] = {"value": value, "step": p["step"], "mode": "min" if lower else "max"}
    return {"final": final, "best": best}


def _is_metric(key: str) -> bool:
    return key not in NOT_METRICS and not key.startswith("control/")


def _example_inputs(card: Mapping[str, Any], n: int = 3) -> list[torch.Tensor]:
    """A small batch drawn inside each input's range (a varying length becomes 8)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in card["inputs"]:
        shape = [n, *[d if d is not None else 8 for d in spec["shape"]]]
        dtype = DTYPES[spec["dtype"]]
        lo, hi = [*(spec.get("range") or []), None, None][:2]
        if dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif dtype.is_floating_point:
            a = float(lo) if lo is not None else -1.0
            b = float(hi) if hi is not None else a + 2.0
            out.append((torch.rand(shape, generator=g, dtype=torch.float64) * (b - a) + a).to(dtype))
        else:
            a = int(lo) if lo is not None else 0
            b = int(hi) if hi is not None else a + 10
            out.append(torch.randint(a, b + 1, shape, generator=g, dtype=torch.int64).to(dtype))
    return out


# ===================================================================================== the bundle
@dataclass
class Bundle:
    """A loaded bundle: ``model`` (eval mode), ``preprocessing``, ``card``; ``predict`` runs them in order."""

    path: Path
    card: dict[str, Any]
    model: nn.Module
    preprocessing: Preprocessing
    tarball: Path | None = None

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return list(self.card["inputs"])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return list(self.card.get("outputs") or [])

    @property
    def labels(self) -> list[str] | None:
        outs = self.outputs
        return list(outs[0]["labels"]) if outs and outs[0].get("labels") else None

    def prepare(self, *inputs: Any, **named: Any) -> list[torch.Tensor]:
        """Batches as tensors of the card's dtypes, preprocessed: what the model receives."""
        specs = self.inputs
        if named:
            if inputs:
                raise BundleError("pass the inputs by position or by name, not both")
            missing = [s["name"] for s in specs if s["name"] not in named]
            if missing:
                raise BundleError(f"missing input(s): {', '.join(missing)}")
            inputs = tuple(named[s["name"]] for s in specs)
        if len(inputs) != len(specs):
            raise BundleError(f"the model takes {len(specs)} input(s) ({', '.join(s['name'] for s in specs)})")
        device = next(self.model.parameters(), torch.zeros(0)).device
        out = []
        for spec, x in zip(specs, inputs, strict=True):
            t = torch.as_tensor(x, dtype=DTYPES[spec["dtype"]]).to(device)
            out.append(self.preprocessing.apply(spec["name"], t))
        return out

    @torch.inference_mode()
    def predict(self, *inputs: Any, **named: Any) -> Any:
        """Preprocess a batch and run the model on it (no gradients)."""
        return self.model(*self.prepare(*inputs, **named))


def save_bundle(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    card: Mapping[str, Any] | Any,
    factory: Callable[..., nn.Module] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    preprocessing: Iterable[Step | Mapping[str, Any]] | Preprocessing = (),
    code: Iterable[str | os.PathLike[str]] = (),
    example: Sequence[Any] | Any = None,
    verify: bool = True,
    tarball: bool = True,
    overwrite: bool = False,
    run: Any = None,
) -> Bundle:
    """Write ``model`` as a bundle folder at ``path`` (and ``<path>.choline-bundle.tar.gz``).

    ``card``: at least ``purpose`` and ``inputs`` (see ``Input``); also ``outputs``, ``data``, ``name``,
    ``description``, ``metrics`` (default: from the run). ``factory(*args, **kwargs)`` rebuilds the model
    (default: its class); its source file is copied into ``code/`` unless it comes from an installed package;
    ``code`` adds files or folders. ``preprocessing``: declarative steps (``scale``, ``normalize`` ...).
    ``verify``: rebuild the model from the written folder and check that its outputs on ``example`` (default:
    a batch drawn from the input schema) are identical. ``run``: the run whose id, step and metrics the card
    records (default: the current one).
    """
    folder = Path(path)
    user = build_card(card)
    check_card(user)
    pipe = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(preprocessing)
    pipe = Preprocessing(pipe.steps, inputs=[s["name"] for s in user["inputs"]])
    factory = factory or type(model)
    module, qual, source = _factory_spec(factory)
    args_json = _jsonable(list(args), "the model's constructor arguments")
    kwargs_json = _jsonable(dict(kwargs or {}), "the model's constructor keyword arguments")
    if not args and not kwargs:
        required = _required_params(factory)
        if required:
            raise BundleError(
                f"{module}.{qual} needs {', '.join(required)} to be rebuilt",
                hint="pass kwargs={...} (JSON values), or factory=a function that builds the model",
            )
    if isinstance(model, nn.Sequential) and factory is nn.Sequential:
        raise BundleError(
            "a torch.nn.Sequential cannot be rebuilt from JSON arguments",
            hint="write a function that builds it and pass factory=that function",
        )
    if run is None:
        from choline.train.run import current_run

        run = current_run()

    if folder.exists() and not overwrite:
        raise BundleError(f"{folder} already exists", hint="pass overwrite=True or choose another path")
    staging = folder.with_name(f".{folder.name}.writing{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # -- code
        code_files: list[str] = []
        if source is not None:
            rel = Path(*module.split(".")).with_suffix(".py")
            if source.name == "__init__.py":
                rel = Path(*module.split(".")) / "__init__.py"
            dest = staging / CODE / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        for extra in code:
            p = Path(extra)
            if p.is_dir():
                shutil.copytree(p, staging / CODE / p.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
            elif p.is_file():
                (staging / CODE).mkdir(exist_ok=True)
                shutil.copyfile(p, staging / CODE / p.name)
            else:
                raise BundleError(f"code: {p} does not exist")
        if (staging / CODE).exists():
            code_files = sorted(q.relative_to(staging).as_posix() for q in (staging / CODE).rglob("*") if q.is_file())
        # -- weights
        from safetensors.torch import save_model

        was_training = model.training
        model.eval()
        state = model.state_dict()
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise BundleError(f"the model's state holds non-tensor values ({', '.join(bad[:5])})")
        save_model(model, str(staging / WEIGHTS), metadata={"format": "pt", "choline": FORMAT})
        params = sum(p.numel() for p in model.parameters())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})

        # -- the card
        digest = hashlib.sha256()
        for f in code_files:
            digest.update(f.encode() + b"\0" + _sha256(staging / f).encode() + b"\0")
        git_commit, git_dirty = _git(source.parent if source is not None else Path.cwd())
        top_pkg = module.split(".")[0]
        full: dict[str, Any] = {
            "format": FORMAT,
            "name": user.get("name") or folder.name,
            "purpose": user["purpose"].strip(),
            "description": user.get("description"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": user["inputs"],
            "outputs": user.get("outputs") or [],
            "preprocessing": pipe.to_json(),
            "model": {
                "framework": "torch",
                "module": module,
                "factory": qual,
                "args": args_json,
                "kwargs": kwargs_json,
                "code": code_files,
                "weights": WEIGHTS,
                "parameters": int(params),
                "dtypes": dtypes,
            },
            "training": {"data": user.get("data") or []},
            "metrics": user.get("metrics"),
            "code": {
                "digest": "sha256:" + digest.hexdigest() if code_files else None,
                "git_commit": git_commit,
                "git_dirty": git_dirty,
            },
            "environment": environment([top_pkg] if source is None and top_pkg not in ("torch", "builtins") else []),
            "files": [],
        }
        if run is not None:
            full["training"].update(
                run_id=run.id,
                attempt=run.attempt,
                step=run.step,
                epochs=run.total_epochs,
                config=_jsonable(dict(run.config), "the run's config"),
            )
            if full["metrics"] is None:
                full["metrics"] = _metrics_of(run)
        if full["metrics"] is None:
            full["metrics"] = {"final": {}, "best": {}}
        for k, v in user.items():
            if k not in full and k not in ("data",):
                full[k] = v
        full = _jsonable(full, "the card")
        files = sorted(q for q in staging.rglob("*") if q.is_file())
        full["files"] = [
            {"path": q.relative_to(staging).as_posix(), "size": q.stat().st_size, "sha256": _sha256(q)} for q in files
        ]
        (staging / CARD).write_text(json.dumps(full, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        model.train(was_training)

        # -- the round trip
        if verify:
            loaded = load_bundle(staging, check_files=True)
            batch = list(example) if isinstance(example, (list, tuple)) else (
                [example] if example is not None else _example_inputs(full)
            )  # fmt: skip
            was_training = model.training
            model.eval()
            try:
                with torch.inference_mode():
                    device = next(model.parameters(), torch.zeros(0)).device
                    ref = model(*[t.to(device) for t in loaded.prepare(*batch)])
                got = loaded.predict(*batch)
            except BundleError:
                raise
            except Exception as exc:
                raise BundleError(
                    f"the model fails on an example of its input schema after the preprocessing: {exc}",
                    hint="check inputs (dtype, shape) and preprocessing, or pass example=[a batch]",
                ) from exc
            finally:
                model.train(was_training)
            if not _same(ref, got):
                raise BundleError(
                    "the model rebuilt from the bundle gives different outputs than the one saved",
                    hint="does the factory build the same architecture from these arguments? is the forward "
                    "deterministic in eval mode?",
                )
        if folder.exists():  # replaced only now: a save that fails keeps the previous bundle
            trash = folder.with_name(f".{folder.name}.replaced{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)
            folder.rename(trash)
            os.replace(staging, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tar = archive.pack(folder) if tarball else None
    result = load_bundle(folder, check_files=False)
    result.tarball = tar
    log.info("bundle %s written (%s)", folder, tar.name if tar else "no tarball")
    return result


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


# ===================================================================================== loading
def verify_files(folder: Path, card: Mapping[str, Any]) -> None:
    listed = card.get("files")
    if not isinstance(listed, list) or not listed:
        raise BundleError(f"{folder}/card.json lists no files")
    for f in listed:
        rel = str(f.get("path", ""))
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not p.is_file() or p.is_symlink():
            raise BundleError(f"{folder}: {rel} is missing or not a regular file")
        if p.stat().st_size != f.get("size") or _sha256(p) != f.get("sha256"):
            raise BundleError(f"{folder}: {rel} does not match the card (damaged or changed)")


def _import_factory(folder: Path, spec: Mapping[str, Any]) -> Callable[..., nn.Module]:
    module, qual = str(spec["module"]), str(spec["factory"])
    code = [str(c) for c in spec.get("code") or []]
    if code:
        rel = Path(CODE, *module.split(".")).with_suffix(".py")
        file = folder / rel
        if not file.is_file():
            file = folder / CODE / Path(*module.split(".")) / "__init__.py"
        if not file.is_file():
            raise BundleError(f"{folder}: the card names module {module!r} but code/ does not hold it")
        unique = f"_choline_bundle_{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]}_{module}"
        unique = unique.replace(".", "_")
        mod = sys.modules.get(unique)
        if mod is None:
            imp_spec = importlib.util.spec_from_file_location(unique, file)
            if imp_spec is None or imp_spec.loader is None:  # pragma: no cover
                raise BundleError(f"cannot import {file}")
            mod = importlib.util.module_from_spec(imp_spec)
            code_dir = str((folder / CODE).resolve())
            sys.path.insert(0, code_dir)
            sys.modules[unique] = mod
            try:
                imp_spec.loader.exec_module(mod)
            except BaseException as exc:
                sys.modules.pop(unique, None)
                raise BundleError(f"importing the bundle's {rel} failed: {exc!r}") from exc
            finally:
                if code_dir in sys.path:
                    sys.path.remove(code_dir)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise BundleError(f"the model's module {module!r} is not installed here: {exc}") from None
    obj: Any = mod
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise BundleError(f"{module} has no {qual!r}")
    return obj  # type: ignore[no-any-return]


def load_bundle(
    path: str | os.PathLike[str],
    *,
    extract_to: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    check_files: bool = True,
) -> Bundle:
    """Rebuild the model (weights through safetensors only) and the preprocessing of a bundle folder or
    tarball (unpacked safely into ``extract_to``, default a new temporary folder)."""
    p = Path(path)
    tar: Path | None = None
    if p.is_file():
        tar = p
        p = archive.extract(p, extract_to or tempfile.mkdtemp(prefix="choline-bundle-"))
    elif not p.is_dir():
        raise BundleError(f"{p} is neither a bundle folder nor a bundle tarball")
    card = read_card(p)
    check_card(card)
    if check_files:
        verify_files(p, card)
    spec = card.get("model") or {}
    factory = _import_factory(p, spec)
    try:
        model = factory(*spec.get("args", []), **spec.get("kwargs", {}))
    except Exception as exc:
        raise BundleError(f"building the model with {spec.get('module')}.{spec.get('factory')} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise BundleError(f"{spec.get('module')}.{spec.get('factory')} did not return a torch.nn.Module")
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(p / spec.get("weights", WEIGHTS)), strict=False)
    except Exception as exc:
        raise BundleError(f"the weights do not fit the rebuilt model: {exc}") from exc
    if missing or unexpected:
        raise BundleError(
            "the weights do not fit the rebuilt model"
            + (f"; missing: {', '.join(sorted(missing)[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(sorted(unexpected)[:5])}" if unexpected else "")
        )
    model.to(device)
    model.eval()
    pipe = Preprocessing(card.get("preprocessing") or [], inputs=[s["name"] for s in card["inputs"]])
    return Bundle(path=p, card=card, model=model, preprocessing=pipe, tarball=tar)
