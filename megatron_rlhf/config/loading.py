"""Building a Config: YAML files, ``key=value`` overrides, did-you-mean errors, and the model
section filled from a ``model.init_from`` checkpoint's metadata.

    cfg = load_config("examples/tiny/sft.yaml", ["train.lr=3e-4"], stage="sft")

An unknown or mistyped key fails with the key, where it came from, and the closest names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_rlhf.config.sections import ARCHITECTURE_FIELDS, Config, ConfigError, ModelConfig  # noqa: F401

def load_config(path: Optional[str], overrides: list[str] = (), stage: Optional[str] = None) -> Config:
    """Build a validated Config from a YAML file (optional) and ``key=value`` overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    source = path or "defaults"
    cfg = _build(Config, raw, prefix="", source=source)
    for item in overrides:
        cfg = apply_override(cfg, item)
    if cfg.model.init_from:
        cfg = dataclasses.replace(cfg, model=model_from_checkpoint(cfg.model, _explicit_model_keys(raw, overrides, path)))
    if stage is not None:
        if path and "stage" in raw and raw["stage"] != stage:
            raise ConfigError(f"{path} is a '{raw['stage']}' config, but the command is '{stage}'")
        cfg = dataclasses.replace(cfg, stage=stage)
    cfg.validate()
    return cfg


def _explicit_model_keys(raw: dict, overrides, path: Optional[str]) -> dict:
    """``{model key: where it was set}`` for the keys the user wrote (YAML or ``key=value``)."""
    out = {k: path for k in (raw.get("model") or {}) if isinstance(raw.get("model"), dict)}
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        if key.startswith("model."):
            out[key[len("model."):].split(".")[0]] = "command line"
        elif key == "model":
            value = yaml.safe_load(text) if text else None
            out.update({k: "command line" for k in (value or {})} if isinstance(value, dict) else {})
    return out


def _checkpoint_meta(init_from: str) -> Optional[tuple[Path, dict]]:
    """``(folder, meta.json)`` of a checkpoint given as a run's output_dir, its
    ``checkpoints/`` folder or one ``iter_N`` folder (as checkpoint.resolve_checkpoint resolves it);
    None where there is none yet (a config read before its run; the recipe that loads the
    checkpoint reports it)."""
    import json

    p = Path(init_from)
    folder = p
    if not (p / "meta.json").is_file():
        for root in (p, p / "checkpoints"):
            if (root / "latest").is_file():
                folder = root / (root / "latest").read_text().strip()
                break
    if not (folder / "meta.json").is_file():
        return None
    try:
        return folder, json.loads((folder / "meta.json").read_text())
    except ValueError as exc:
        raise ConfigError(f"model.init_from={init_from}: {folder / 'meta.json'} is not valid JSON ({exc})") from None


def model_from_checkpoint(model: ModelConfig, explicit: dict) -> ModelConfig:
    """Fill the model section from ``model.init_from``'s meta.json.

    The architecture (:data:`ARCHITECTURE_FIELDS`), ``seq_length`` and ``vocab_size`` come
    from the checkpoint, and ``tokenizer`` becomes the checkpoint folder (which carries its
    tokenizer) unless set. A key the user set (``explicit``: key -> where) that disagrees is
    an error naming both values; ``seq_length`` may differ for RoPE models (positions are
    not learned), never for GPT-2's learned positions. A path without a checkpoint (yet)
    changes nothing: the recipe that loads it says what is missing.
    """
    found = _checkpoint_meta(model.init_from)
    if found is None:
        return model
    folder, meta = found
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise ConfigError(f"model.init_from={model.init_from}: {folder / 'meta.json'} has no 'model' section")
    known = {f.name for f in fields(ModelConfig)}
    updates, conflicts = {}, []
    wanted = [k for k in ARCHITECTURE_FIELDS + ("seq_length",) if k in saved and k in known]
    flavour = saved.get("flavour", model.flavour)
    for key in wanted:
        value = saved[key]
        if key in explicit:
            if getattr(model, key) != value and not (key == "seq_length" and flavour == "llama"):
                conflicts.append(f"model.{key}={getattr(model, key)!r} ({explicit[key]}) but the checkpoint has {value!r}")
        else:
            updates[key] = value
    vocab = meta.get("vocab_size")
    if model.vocab_size is not None and vocab is not None and model.vocab_size != vocab:
        conflicts.append(f"model.vocab_size={model.vocab_size!r} ({explicit.get('vocab_size', 'config')}) but the checkpoint has {vocab!r}")
    if conflicts:
        raise ConfigError(
            f"model.init_from={model.init_from} ({folder}) fixes the architecture: " + "; ".join(conflicts)
            + ". Remove these keys from the model section (they are read from the checkpoint)"
        )
    if not model.tokenizer:
        updates["tokenizer"] = str(folder)
    return dataclasses.replace(model, **updates)


def apply_override(cfg: Config, item: str) -> Config:
    """Apply one ``section.key=value`` override (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    return _set_path(cfg, parts, value, key, source="command line")


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(raw: dict, source: str) -> Config:
    cfg = _build(Config, raw, prefix="", source=source)
    cfg.validate()
    return cfg


def _set_path(obj, parts, value, full_key, source):
    name = parts[0]
    known = {f.name: f for f in fields(obj)}
    if name not in known:
        _unknown_key(full_key, name, known, obj, source)
    current = getattr(obj, name)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full_key}' is a section; set one of its keys, e.g. {full_key}.{fields(current)[0].name}=...")
            new = _build(type(current), value, prefix=full_key + ".", source=source, base=current)
        else:
            new = _coerce(value, _field_type(type(obj), name), full_key, source)
        return dataclasses.replace(obj, **{name: new})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"{source}: '{'.'.join(parts[:1])}' in '{full_key}' is not a section")
    return dataclasses.replace(obj, **{name: _set_path(current, parts[1:], value, full_key, source)})


def _build(cls, raw: dict, prefix: str, source: str, base=None):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    obj = base if base is not None else cls()
    known = {f.name: f for f in fields(cls)}
    updates = {}
    for key, value in raw.items():
        if key not in known:
            _unknown_key(prefix + str(key), str(key), known, obj, source)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _build(type(current), value or {}, prefix + key + ".", source, base=current)
        else:
            updates[key] = _coerce(value, _field_type(cls, key), prefix + key, source)
    return dataclasses.replace(obj, **updates)


# Names users bring from other trainers (Hugging Face, NeMo, Megatron-LM flags).
_ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "train_iters": "max_steps", "max_iters": "max_steps",
    "num_train_epochs": "epochs", "batch_size": "global_batch_size", "grad_clip": "clip_grad",
    "max_grad_norm": "clip_grad", "warmup_steps": "lr_warmup_steps", "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size", "tensor_parallel_size": "tensor_model_parallel_size",
    "pipeline_parallel_size": "pipeline_model_parallel_size", "max_seq_len": "seq_length",
    "max_position_embeddings": "seq_length", "num_heads": "num_attention_heads", "n_layer": "num_layers",
    "dropout": "hidden_dropout", "beta": "kl_coef", "init_kl_coef": "kl_coef", "ptx_loss_coef": "ptx_coef",
    "loss_type": "loss", "num_generations": "samples_per_prompt", "n_samples_per_prompt": "samples_per_prompt",
    "rollout_n": "samples_per_prompt", "adv_estimator": "advantage_estimator",
}


def _unknown_key(full_key, name, known, obj, source):
    candidates = list(known)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if _ALIASES.get(name) in candidates:
        close = [_ALIASES[name]] + [c for c in close if c != _ALIASES[name]]
    # also look one level down, for a key put in the wrong section (e.g. model.lr)
    elsewhere = []
    for fname in candidates:
        sub = getattr(obj, fname)
        if dataclasses.is_dataclass(sub):
            elsewhere += [f"{fname}.{m}" for m in difflib.get_close_matches(name, [f.name for f in fields(sub)], n=2, cutoff=0.8)]
    section = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    hints = [section + c for c in close] + elsewhere
    hint = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else f"; valid keys here: {', '.join(candidates)}"
    raise ConfigError(f"{source}: unknown config key '{full_key}'{hint}")


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation, key: str, source: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    number = float(value)  # YAML reads 3e-4 (no dot) as a string
                except ValueError:
                    number = None
                if number is not None and math.isfinite(number):
                    return number
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


